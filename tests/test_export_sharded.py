"""Multi-host safetensors export (`convert.sharded_writer`): HF shard-size semantics, every layout
hook on sharded blocks against the safetensors library, two real JAX processes writing one export
that `from_pretrained` loads with identical logits, and the host-memory bound."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import tracemalloc

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import load_file

from uniecg_jax import sharding
from uniecg_jax.convert import sharded_writer
from uniecg_jax.convert.sharded_writer import ExportTensor, TensorLayout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_max_shard_size_follows_hugging_face():
    assert sharded_writer.parse_size("5GB") == 5 * 10 ** 9
    assert sharded_writer.parse_size("500MB") == 5 * 10 ** 8
    assert sharded_writer.parse_size("2GiB") == 2 * 2 ** 30
    assert sharded_writer.parse_size(1234) == 1234
    with pytest.raises(Exception, match="expected a number of bytes"):
        sharded_writer.parse_size("5 gigs")
    # huggingface_hub's own example: [6, 6, 2, 6, 2, 2] GB at 10GB -> [6], [6+2], [6+2+2]; a tensor
    # over the limit goes alone into a file at once, before the open one (as
    # `split_state_dict_into_shards_factory` of huggingface_hub 2.4.0 does).
    sizes = [6, 6, 2, 6, 2, 2, 11, 1]
    tensors = [ExportTensor(f"t{i}", np.zeros((size * 250,), np.float32))
               for i, size in enumerate(sizes)]
    plans = sharded_writer.plan_files(tensors, max_shard_size="10KB")
    assert [[t.name for t in p.tensors] for p in plans] == [
        ["t0"], ["t1", "t2"], ["t6"], ["t3", "t4", "t5"], ["t7"]]
    assert plans[0].filename == "model-00001-of-00005.safetensors"
    assert [p.filename for p in sharded_writer.plan_files(tensors, max_shard_size=None)] == [
        "model.safetensors"]


def _layouts(rng):
    """(our array [global], layout, the HF tensor numpy computes) for every hook kind."""
    kernel = rng.standard_normal((16, 4, 6)).astype(np.float32)      # [D, H, Dh] q kernel
    out = rng.standard_normal((4, 6, 16)).astype(np.float32)          # [H, Dh, D] o kernel
    stacked = rng.standard_normal((3, 16, 8)).astype(np.float32)      # [L, D, F] scanned mlp
    bias = rng.standard_normal((4, 6)).astype(np.float32)             # [H, Dh] bias
    embed = rng.standard_normal((24, 16)).astype(np.float32)          # [V, D]
    conv = rng.standard_normal((2, 2, 3, 16)).astype(np.float32)      # [kh, kw, C, D] patch conv
    return [
        ("conv", conv, TensorLayout(permute=(3, 2, 0, 1)), conv.transpose(3, 2, 0, 1)),
        ("q", kernel, TensorLayout(None, ((0,), (1, 2)), True), kernel.reshape(16, 24).T),
        ("o", out, TensorLayout(None, ((0, 1), (2,)), True), out.reshape(24, 16).T),
        ("up1", stacked, TensorLayout(1, ((0,), (1,)), True), stacked[1].T),
        ("bias", bias, TensorLayout(None, ((0, 1),)), bias.reshape(24)),
        ("embed", embed, TensorLayout(), embed),
    ]


@pytest.mark.parametrize("spec", ["fsdp0", "fsdp1", "fsdp_tensor", "replicated"])
def test_blocks_of_sharded_arrays_equal_the_whole_tensor(spec, tmp_path):
    mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2))
    rng = np.random.default_rng(0)
    tensors, expected = [], {}
    specs = {  # per tensor: the mesh axis of each of our axes (merged axes split on their first)
        "fsdp0": {"conv": (None, None, None, "fsdp"), "q": ("fsdp", None, None),
                  "o": ("fsdp", None, None),
                  "up1": (None, "fsdp", None), "bias": ("fsdp", None), "embed": ("fsdp", None)},
        "fsdp1": {"conv": ("tensor", None, None, "fsdp"), "q": (None, "fsdp", None),
                  "o": (None, None, "fsdp"),
                  "up1": (None, None, "fsdp"), "bias": ("tensor", None), "embed": (None, "fsdp")},
        "fsdp_tensor": {"conv": (None, "tensor", None, "fsdp"), "q": ("fsdp", "tensor", None),
                        "o": ("tensor", None, "fsdp"),
                        "up1": (None, "fsdp", "tensor"), "bias": ("fsdp", None),
                        "embed": ("tensor", "fsdp")},
        "replicated": {}}[spec]
    for name, array, layout, hf in _layouts(rng):
        placed = jax.device_put(array, NamedSharding(mesh, PartitionSpec(*specs.get(name, ()))))
        tensors.append(ExportTensor(name, placed, layout))
        expected[name] = hf
    # bf16 cast on the devices, and a split into several files.
    tensors.append(ExportTensor("embed_bf16", tensors[-1].array, TensorLayout(), ml_dtypes.bfloat16))
    expected["embed_bf16"] = expected["embed"].astype(ml_dtypes.bfloat16)
    # A tensor joined from two sharded leaves on the host (open_clip's fused in_proj).
    halves = [tensors[1].array, tensors[1].array * 2]
    tensors.append(ExportTensor("joined", sharded_writer.HostTensor(
        (32, 24), np.float32, lambda: np.concatenate(
            [sharded_writer.gather_to_host(h).reshape(16, 24) for h in halves]))))
    expected["joined"] = np.concatenate([expected["q"].T, 2 * expected["q"].T])
    files = sharded_writer.write_safetensors(tensors, str(tmp_path), max_shard_size="1KB",
                                             progress=False)
    index = json.load(open(tmp_path / files[-1]))
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors)
    loaded = {}
    for file in files[:-1]:
        loaded.update(load_file(str(tmp_path / file)))   # the safetensors library validates
    assert set(loaded) == set(expected) == set(index["weight_map"])
    for name, want in expected.items():
        assert loaded[name].dtype == want.dtype, name
        np.testing.assert_array_equal(loaded[name], want, err_msg=name)


def test_a_shard_that_splits_a_merged_axis_is_refused(tmp_path):
    mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2))
    bias = jax.device_put(np.zeros((4, 6), np.float32),
                          NamedSharding(mesh, PartitionSpec(None, "tensor")))
    with pytest.raises(Exception, match="splits axis"):
        sharded_writer.write_safetensors([ExportTensor("b", bias, TensorLayout(None, ((0, 1),)))],
                                         str(tmp_path), progress=False)


def test_writer_holds_one_block_at_a_time():
    """Peak host memory (tracemalloc: every numpy/bytes allocation of the writer) while writing a
    192 MiB state of 12 x 16 MiB float32 tensors sharded over 8 devices (one transposed on the way,
    like nn.Linear weights): one shard (2 MiB), and for a replicated tensor one tensor (16 MiB),
    never the state."""
    mesh = sharding.make_mesh(dict(data=1, fsdp=8, tensor=1))
    key = jax.random.PRNGKey(0)
    tensors = []
    for i in range(12):
        spec = PartitionSpec() if i == 0 else PartitionSpec("fsdp")
        array = jax.jit(lambda k: jax.random.normal(k, (1024, 4096)),
                        out_shardings=NamedSharding(mesh, spec))(jax.random.fold_in(key, i))
        tensors.append(ExportTensor(f"w{i}", array, TensorLayout(None, ((0,), (1,)), i == 1)))
    tensor_bytes = tensors[0].nbytes
    import tempfile
    with tempfile.TemporaryDirectory() as out:
        tracemalloc.start()
        try:
            sharded_writer.write_safetensors(tensors[1:], out, max_shard_size="100MB",
                                             progress=False)
            sharded_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            sharded_writer.write_safetensors(tensors[:1], out, prefix="replicated",
                                             progress=False)
            replicated_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    print(f"writer peak host memory: {sharded_peak / 2 ** 20:.1f} MiB for a "
          f"{11 * tensor_bytes / 2 ** 20:.0f} MiB fsdp-sharded state (shard "
          f"{tensor_bytes / 8 / 2 ** 20:.0f} MiB); {replicated_peak / 2 ** 20:.1f} MiB for one "
          f"replicated {tensor_bytes / 2 ** 20:.0f} MiB tensor")
    assert sharded_peak < tensor_bytes / 8 + 2 ** 20
    assert replicated_peak < tensor_bytes + 2 ** 20


def test_host_computed_tensors_are_computed_one_at_a_time():
    """`HostTensor`s (ten 4 MiB tensors, each joined on the host from two fsdp-sharded leaves):
    the writer's peak host memory is about one tensor plus its gathered leaves, never the state;
    a computed tensor of the wrong shape is an error."""
    mesh = sharding.make_mesh(dict(data=1, fsdp=8, tensor=1))
    leaves = [jax.jit(lambda k: jax.random.normal(k, (512, 1024)),
                      out_shardings=NamedSharding(mesh, PartitionSpec("fsdp")))(
        jax.random.PRNGKey(i)) for i in range(20)]

    def joined(a, b):
        return lambda: np.concatenate([sharded_writer.gather_to_host(a),
                                       sharded_writer.gather_to_host(b)])
    tensors = [ExportTensor(f"t{i}", sharded_writer.HostTensor(
        (1024, 1024), np.float32, joined(leaves[2 * i], leaves[2 * i + 1]))) for i in range(10)]
    tensor_bytes = tensors[0].nbytes
    import tempfile
    with tempfile.TemporaryDirectory() as out:
        tracemalloc.start()
        try:
            sharded_writer.write_safetensors(tensors, out, max_shard_size="20MB", progress=False)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        loaded = load_file(os.path.join(out, "model-00001-of-00003.safetensors"))
        np.testing.assert_array_equal(loaded["t1"], np.concatenate(
            [np.asarray(leaves[2]), np.asarray(leaves[3])]))
        bad = [ExportTensor("bad", sharded_writer.HostTensor((3,), np.float32,
                                                             lambda: np.zeros(4, np.float32)))]
        with pytest.raises(Exception, match=r"shape \(4,\).*\(3,\)"):
            sharded_writer.write_safetensors(bad, out, prefix="bad", progress=False)
    print(f"writer peak host memory: {peak / 2 ** 20:.1f} MiB for ten host-computed "
          f"{tensor_bytes / 2 ** 20:.0f} MiB tensors")
    assert peak < 2.5 * tensor_bytes


# Every worker: 4 CPU devices, gloo collectives, process `argv[2]` of 2; `src`, `dst` from argv.
WORKER_PREAMBLE = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, process_id, src, dst = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                               process_id=process_id)
""")
WORKER = WORKER_PREAMBLE + textwrap.dedent("""
    from uniecg_jax import sharding
    from uniecg_jax.convert import hf_llm, sharded_writer
    from uniecg_jax.models.llm import LLMConfig
    config = LLMConfig.from_config(hf_llm.model_config_from_hf(src))
    # 8 devices over 2 processes: fsdp over 4, tensor over 2; the import builds each host's
    # shards only (make_array_from_callback).
    mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2))
    params = hf_llm.load_hf_params(src, config, mesh=mesh)
    written = []
    original = sharded_writer.write_host_blocks
    sharded_writer.write_host_blocks = lambda *a, **k: written.append(original(*a, **k)) or written[-1]
    hf_llm.save_hf(params, config, dst, tokenizer_dir=src, max_shard_size="20KB")
    leaf = params["layers"]["mlp"]["up"]["kernel"] if config.scan_layers else params[
        "layers_0"]["mlp"]["up"]["kernel"]
    print("RESULT " + json.dumps({"process": jax.process_index(), "written": written[0],
                                  "devices": jax.device_count(),
                                  "local_devices": jax.local_device_count(),
                                  "fully_addressable": leaf.is_fully_addressable}), flush=True)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_two_processes(worker: str, src: str, dst: str, tmp_path, timeout: int = 900) -> list[dict]:
    """Runs `worker` (WORKER_PREAMBLE + a body printing one `RESULT {json}` line) as JAX processes
    0 and 1 of one job; returns their results, or fails with the end of their output."""
    script = tmp_path / "worker.py"
    script.write_text(worker)
    port = str(_free_port())
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    workers = [subprocess.Popen([sys.executable, str(script), port, str(i), src, dst],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env) for i in range(2)]
    outputs = [w.communicate(timeout=timeout)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    return [json.loads(line[len("RESULT "):]) for o in outputs for line in o.splitlines()
            if line.startswith("RESULT ")]


@pytest.mark.slow  # two fresh JAX processes + transformers imports: ~1 min on 2 loaded cores
def test_two_processes_export_one_hf_model_with_identical_logits(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from uniecg_jax.convert import hf_testing
    src, dst = tmp_path / "src", tmp_path / "dst"
    model = hf_testing.tiny_hf_model("qwen2", src)
    hf_testing.tiny_tokenizer(src)
    results = run_two_processes(WORKER, str(src), str(dst), tmp_path)
    assert sorted(r["process"] for r in results) == [0, 1]
    assert all(r["devices"] == 8 and r["local_devices"] == 4 for r in results)
    assert not any(r["fully_addressable"] for r in results)   # the params really span both hosts
    index = json.load(open(dst / "model.safetensors.index.json"))
    total = index["metadata"]["total_size"]
    # Each process wrote only its own blocks: together exactly the model, neither all of it.
    assert sum(r["written"] for r in results) == total
    assert all(0 < r["written"] < total for r in results)
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(dst)).float().eval()
    ids = torch.tensor(np.random.RandomState(0).randint(3, 96, (2, 11)))
    with torch.no_grad():
        want, got = model(ids).logits.numpy(), reloaded(ids).logits.numpy()
    np.testing.assert_array_equal(got, want)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_unified_export_components_are_written_by_the_sharded_writer(tmp_path):
    from uniecg_jax.convert import unified_export
    mesh = sharding.make_mesh(dict(data=1, fsdp=8, tensor=1))
    rng = np.random.default_rng(1)
    tree = {"blocks_0": {"kernel": jax.device_put(rng.standard_normal((16, 8)).astype(np.float32),
                                                  NamedSharding(mesh, PartitionSpec("fsdp"))),
                         "bias": np.arange(8, dtype=np.float32)},
            "cls": jax.numpy.ones((1, 8), jax.numpy.bfloat16)}
    unified_export._save(tree, str(tmp_path), "ecg_tower.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["ecg_tower.safetensors"]
    loaded = unified_export._load(str(tmp_path / "ecg_tower.safetensors"))
    want = unified_export.flatten_params(tree)
    assert set(loaded) == set(want) == {"blocks_0.kernel", "blocks_0.bias", "cls"}
    for name in want:
        assert loaded[name].dtype == want[name].dtype
        np.testing.assert_array_equal(loaded[name], want[name])
