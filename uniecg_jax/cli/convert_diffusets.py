"""`uniecg convert diffusets`: DiffuSETS PyTorch checkpoints -> a uniecg diffusion model checkpoint.

  uniecg convert diffusets --vae prerequisites/vae_model.pth --unet prerequisites/unet_all.pth \
      --out W/model [--config configs/diffusion.py:diffusets] [--text-encoder precomputed:E.npz]

The UNet's text width is read from the checkpoint and written to `text.embed_dim`; every tensor is
checked against the Flax model, and errors name the tensor. The stored text encoder is the one the
weights were trained with (`convert.diffusets.DIFFUSETS_TEXT_ENCODERS`: 8192-d -> the public
release's E-72B endpoint, 1536-d -> OpenAI text-embedding-ada-002 with $OPENAI_API_KEY, both with
DiffuSETS's prompt template), or --text-encoder; for any other width the converter says which
width an encoder must give. The model samples as DiffuSETS does (DDPM, 1000 steps, guidance 1):
`uniecg generate --ckpt W/model --text "Sinus rhythm|Normal ECG." ...` (or --embedding E.npy);
`--sampler ddim --steps 50` for speed. Wire into `cli/convert.py` with
`convert_diffusets.add_parser(actions)`.
"""
from __future__ import annotations

VALUE_COMBINER = "value_combiner.weight"  # cross-attention Linear(text + 3 -> channels)


def add_parser(convert_subparsers) -> None:
    parser = convert_subparsers.add_parser(
        "diffusets", help="DiffuSETS VAE + UNet .pth -> uniecg diffusion checkpoint",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae", required=True, help="DiffuSETS VAE .pth ({encoder, decoder})")
    parser.add_argument("--unet", required=True, help="DiffuSETS ECGconditional state dict .pth")
    parser.add_argument("--out", required=True, help="output model checkpoint directory")
    parser.add_argument("--config", default="configs/diffusion.py:diffusets",
                        help="diffusion config the weights fit (default: the DiffuSETS sizes)")
    parser.add_argument("--text-encoder", default=None,
                        help="text.encoder stored with the model (e.g. precomputed:E.npz)")
    parser.set_defaults(handler=run)


def text_width_of(unet_state) -> int | None:
    """The text-embedding width the UNet was trained with (from a cross-attention combiner)."""
    for key, tensor in unet_state.items():
        if key.endswith(VALUE_COMBINER):
            return int(tuple(tensor.shape)[1]) - 3
    return None


def _set_text_encoder(config, width: int) -> None:
    """`config.text` := the encoder DiffuSETS's weights of this width were trained with; else
    keeps the config's encoder and says which width one must give."""
    from uniecg_jax.convert.diffusets import DIFFUSETS_TEXT_ENCODERS, text_settings_for_width

    settings = text_settings_for_width(width)
    if settings is None:
        print(f"note: the UNet reads {width}-d text embeddings, which no known DiffuSETS encoder "
              f"gives (known: {sorted(DIFFUSETS_TEXT_ENCODERS)}); generate with --embedding "
              f"E.npy or --text-encoder NAME of a {width}-d encoder")
        return
    config.text.encoder = settings["encoder"]
    config.text.template = settings["template"]
    config.text.endpoint.api_key_env = settings["endpoint.api_key_env"]


def convert(vae_path: str, unet_path: str, out: str, config, text_encoder_given: bool = False
            ) -> str:
    """Imports both files onto `config`'s model (text width taken from the UNet; the text encoder
    set to match it unless `text_encoder_given`) and saves `out`."""
    import ml_collections

    from uniecg_jax.checkpoint import save_model
    from uniecg_jax.convert import diffusets
    from uniecg_jax.errors import CheckpointError
    from uniecg_jax.models.unet import UNetConfig
    from uniecg_jax.models.vae import VAEConfig

    unet_state = diffusets.load_torch_file(unet_path)
    vae_state = diffusets.load_torch_file(vae_path)
    if not hasattr(unet_state, "items"):
        raise CheckpointError(f"{unet_path}: expected a state dict, got {type(unet_state).__name__}")
    config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy: text widths set below
    width = text_width_of(unet_state)
    if width is not None:
        config.text.embed_dim = width
        config.model.unet.text_embed_dim = width
        if not text_encoder_given:
            _set_text_encoder(config, width)
    try:
        unet = diffusets.unet_from_torch(unet_state, UNetConfig.from_config(
            config.model.unet, config.diffusion.num_steps))
    except CheckpointError as e:
        raise CheckpointError(f"{unet_path}: {e}") from None
    try:
        vae = diffusets.vae_from_torch(vae_state, VAEConfig.from_config(config.model.vae))
    except CheckpointError as e:
        raise CheckpointError(f"{vae_path}: {e}") from None
    if "encoder" not in vae["params"] or "decoder" not in vae["params"]:
        raise CheckpointError(f"{vae_path}: needs both encoder and decoder weights")
    return save_model(out, {"vae": vae["params"], "unet": unet["params"]}, config)


def run(args) -> int:
    from uniecg_jax.config import load_config

    config = load_config(args.config, args.config_overrides)
    if args.text_encoder:
        with config.unlocked():
            config.text.encoder = args.text_encoder
    out = convert(args.vae, args.unet, args.out, config, text_encoder_given=bool(args.text_encoder))
    print(f"wrote {out} (DiffuSETS VAE + UNet)")
    return 0
