"""The OpenAI-compatible `/v1/embeddings` text encoder against a local stub server (no network):
batching, input order, retry on 5xx, no retry on 4xx, the key, the width check against the UNet,
and `uniecg generate --text` with an endpoint encoder on a converted-style checkpoint."""
import http.server
import json
import threading

import ml_collections
import numpy as np
import pytest

from uniecg_jax.data import text_encoder as te
from uniecg_jax.errors import ConfigError, UniECGError

FAST = te.EndpointOptions(api_key_env="STUB_KEY", batch_size=3, timeout_s=5.0, max_retries=2,
                          backoff_s=0.01)


def fake_embedding(text: str, width: int) -> list[float]:
    """A deterministic embedding of one text (so tests can check order)."""
    rng = np.random.default_rng(sum(map(ord, text)))
    return rng.standard_normal(width).round(6).tolist()


class StubEmbeddings:
    """A local `/v1/embeddings` server: answers `width`-d embeddings in shuffled `data` order,
    fails the first `failures` requests with `fail_status`, and records every request."""

    def __init__(self, width=16, failures=0, fail_status=503):
        self.width, self.failures, self.fail_status = width, failures, fail_status
        self.requests = []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "body": body,
                                      "auth": self.headers.get("Authorization")})
                if stub.failures > 0:
                    stub.failures -= 1
                    self._reply(stub.fail_status, {"error": "stub failure"})
                    return
                data = [{"object": "embedding", "index": i,
                         "embedding": fake_embedding(text, stub.width)}
                        for i, text in enumerate(body["input"])]
                self._reply(200, {"object": "list", "data": data[::-1], "model": body["model"]})

            def _reply(self, status, payload):
                raw = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("STUB_KEY", "sk-test")


def test_batches_keep_order_and_send_the_key(key):
    texts = [f"report {i}" for i in range(7)]
    with StubEmbeddings(width=16) as stub:
        encoder = te.get_text_encoder(f"endpoint:my-model@{stub.url}/", FAST, expected_dim=16)
        embeddings = encoder.encode(texts)
    assert embeddings.shape == (7, 16) and embeddings.dtype == np.float32 and encoder.dim == 16
    np.testing.assert_allclose(embeddings, [fake_embedding(t, 16) for t in texts], rtol=1e-6)
    assert [len(r["body"]["input"]) for r in stub.requests] == [3, 3, 1]
    assert {r["path"] for r in stub.requests} == {"/v1/embeddings"}
    assert {r["body"]["model"] for r in stub.requests} == {"my-model"}
    assert {r["auth"] for r in stub.requests} == {"Bearer sk-test"}


def test_retries_5xx_then_succeeds_and_gives_up_after_max_retries(key):
    with StubEmbeddings(width=8, failures=2, fail_status=502) as stub:
        encoder = te.EndpointTextEncoder("m", stub.url, FAST)
        assert encoder.encode(["a", "b"]).shape == (2, 8)
    assert len(stub.requests) == 3                      # 2 failures + 1 success
    with StubEmbeddings(width=8, failures=10, fail_status=500) as stub:
        with pytest.raises(UniECGError, match=r"no embeddings after 3 attempts; last error HTTP 500"):
            te.EndpointTextEncoder("m", stub.url, FAST).encode(["a"])
    assert len(stub.requests) == 3


def test_client_errors_are_not_retried(key):
    with StubEmbeddings(failures=1, fail_status=401) as stub:
        with pytest.raises(UniECGError, match=r"HTTP 401 \(check the key in \$STUB_KEY\)"):
            te.EndpointTextEncoder("m", stub.url, FAST).encode(["a"])
    assert len(stub.requests) == 1


def test_width_mismatch_names_both_widths(key):
    with StubEmbeddings(width=12) as stub:
        encoder = te.EndpointTextEncoder("m", stub.url, FAST, expected_dim=1536)
        with pytest.raises(UniECGError, match=r"gives 12-d embeddings but the model's UNet "
                                              r"expects 1536-d"):
            encoder.encode(["sinus rhythm"])
    config = ml_collections.ConfigDict(dict(text=dict(encoder="hash:32", embed_dim=8192)))
    with pytest.raises(ConfigError, match=r"gives 32-d embeddings but the model's UNet expects "
                                          r"8192-d"):
        te.text_encoder_for(config)


def test_missing_key_and_bad_names(monkeypatch):
    monkeypatch.delenv("STUB_KEY", raising=False)
    with pytest.raises(UniECGError, match=r"API key variable STUB_KEY is not set"):
        te.get_text_encoder("endpoint:m@http://127.0.0.1:9/v1", FAST)
    no_key = te.EndpointTextEncoder("m", "http://127.0.0.1:9/v1",
                                    te.EndpointOptions(api_key_env=""))   # keyless services
    assert no_key.dim is None
    for bad in ("endpoint:m", "endpoint:@http://x", "endpoint:m@ftp://x"):
        with pytest.raises(UniECGError, match="endpoint:MODEL@BASE_URL"):
            te.check_text_encoder_name(bad)


def test_text_encoder_for_reads_the_endpoint_group_and_template(key):
    with StubEmbeddings(width=16) as stub:
        config = ml_collections.ConfigDict(dict(text=dict(
            encoder=f"endpoint:m@{stub.url}", embed_dim=16, template="diffusets",
            endpoint=dict(api_key_env="STUB_KEY", batch_size=1, max_retries=0))))
        embeddings = te.text_encoder_for(config).encode(["Sinus rhythm|Normal ECG.", "a|b"])
    assert embeddings.shape == (2, 16)
    assert [r["body"]["input"] for r in stub.requests] == [
        ["Most importantly, the 1st diagnosis is {Sinus rhythm}.As a supplementary condition, "
         "the 2nd diagnosis is {Normal ECG.}."],
        ["Most importantly, the 1st diagnosis is {a}.As a supplementary condition, the 2nd "
         "diagnosis is {b}."]]
    config.text.endpoint.unknown = 1
    with pytest.raises(ConfigError, match="text.endpoint: unknown keys"):
        te.text_encoder_for(config)


@pytest.mark.slow
def test_generate_text_with_an_endpoint_encoder(tmp_path, key):
    """`uniecg generate --text` with --text-encoder endpoint:... on a tiny diffusion checkpoint:
    the width matches -> ECGs are written; a wrong width fails naming both widths."""
    import argparse
    import jax

    from uniecg_jax.checkpoint import save_model
    from uniecg_jax.cli import generate
    from uniecg_jax.config import load_config
    from uniecg_jax.layers.params import init_params_on_host
    from uniecg_jax.models.unet import ConditionalUNet, UNetConfig
    from uniecg_jax.models.vae import VAE, VAEConfig

    config = load_config("configs/diffusion.py:tiny", ["text.encoder=hash:16", "text.embed_dim=16",
                                                       "model.unet.rhythm_condition=False"])
    vae = VAE(VAEConfig.from_config(config.model.vae))
    unet = ConditionalUNet(UNetConfig.from_config(config.model.unet, config.diffusion.num_steps))
    import jax.numpy as jnp
    vae_params = init_params_on_host(vae, 0, jnp.zeros((1, 1024, 12)))["params"]
    unet_params = init_params_on_host(unet, 0, jnp.zeros((1, 128, 4)), jnp.zeros((1,), jnp.int32),
                                      jnp.zeros((1, 19)))["params"]
    save_model(str(tmp_path / "model"), jax.device_get({"vae": vae_params, "unet": unet_params}),
               config)
    parser = argparse.ArgumentParser()
    generate.register(parser.add_subparsers())
    for width, expect_ok in ((16, True), (24, False)):
        with StubEmbeddings(width=width) as stub:
            args = parser.parse_args([
                "generate", "--ckpt", str(tmp_path / "model"), "--text", "Sinus rhythm|Normal ECG.",
                "--hr", "70", "--age", "50", "--sex", "M", "--out", str(tmp_path / f"out{width}"),
                "--steps", "2", "--no-png", "--text-encoder", f"endpoint:m@{stub.url}",
                "--template", "diffusets", "--api-key-env", "STUB_KEY"])
            if expect_ok:
                assert args.handler(args) == 0
                assert (tmp_path / "out16" / "gen_000.hea").exists()
                assert stub.requests[0]["body"]["input"][0].startswith("Most importantly")
            else:
                with pytest.raises(UniECGError, match="gives 24-d embeddings but the model's UNet "
                                                      "expects 16-d"):
                    args.handler(args)


@pytest.mark.slow
def test_diffusets_preset_and_converted_text_encoder(capsys):
    """configs/diffusion.py:diffusets trains and samples as DiffuSETS b610a00 (utils/train.py:
    t ~ randint(1, 999), no condition dropout; inference: DDPM 1000, no guidance), and a converted
    checkpoint gets the encoder its UNet width was trained with."""
    import jax
    import jax.numpy as jnp

    from uniecg_jax.cli import convert_diffusets
    from uniecg_jax.config import load_config
    from uniecg_jax.diffusion import losses, schedule

    config = load_config("configs/diffusion.py:diffusets")
    assert (config.sample.sampler, config.sample.steps, config.sample.guidance) == ("ddpm", 1000, 1.0)
    assert config.diffusion.cfg_dropout == 0.0
    cfg = schedule.DiffusionConfig.from_config(config.diffusion)
    assert schedule.training_timestep_range(cfg) == (1, 999)
    assert schedule.training_timestep_range(schedule.DiffusionConfig()) == (0, 1000)
    with pytest.raises(ValueError, match="train_timestep_low/high"):
        schedule.training_timestep_range(schedule.DiffusionConfig(train_timestep_low=1000))

    # diffusion_loss draws its timesteps from that range (captured at add_noise).
    seen = []
    tiny = load_config("configs/diffusion.py:tiny", ["text.encoder=hash:8", "text.embed_dim=8",
                                                     "model.unet.rhythm_condition=False",
                                                     "diffusion.train_timestep_low=997",
                                                     "diffusion.train_timestep_high=999"])
    from uniecg_jax.models.unet import ConditionalUNet, UNetConfig
    unet = ConditionalUNet(UNetConfig.from_config(tiny.model.unet, tiny.diffusion.num_steps))
    params = unet.init(jax.random.PRNGKey(0), jnp.zeros((1, 128, 4)), jnp.zeros((1,), jnp.int32),
                       jnp.zeros((1, 11)))
    original = schedule.add_noise
    try:
        schedule.add_noise = lambda s, clean, noise, t: (seen.append(np.asarray(t)),
                                                         original(s, clean, noise, t))[1]
        batch = {"latent": jnp.zeros((64, 128, 4)), "text_embedding": jnp.zeros((64, 8)),
                 "sex": jnp.ones(64), "age": jnp.ones(64), "hr": jnp.ones(64)}
        losses.diffusion_loss(params, batch, jax.random.PRNGKey(1), unet, tiny)
    finally:
        schedule.add_noise = original
    assert set(seen[0].tolist()) == {997, 998}

    unlocked = ml_collections.ConfigDict(config.to_dict())
    convert_diffusets._set_text_encoder(unlocked, 1536)
    assert unlocked.text.encoder == "endpoint:text-embedding-ada-002@https://api.openai.com/v1"
    assert (unlocked.text.template, unlocked.text.endpoint.api_key_env) == ("diffusets",
                                                                            "OPENAI_API_KEY")
    convert_diffusets._set_text_encoder(unlocked, 8192)
    assert unlocked.text.encoder.startswith("endpoint:E-72B@")
    assert unlocked.text.endpoint.api_key_env == ""
    convert_diffusets._set_text_encoder(unlocked, 24)
    assert unlocked.text.encoder.startswith("endpoint:E-72B@")      # unknown width: unchanged
    assert "reads 24-d text embeddings" in capsys.readouterr().out
