"""The scale-out recipes: the Slurm and Kubernetes files, the memory estimate, and a two-node torchrun on one machine.

Each memory check compares against something independent: GPT-2's published parameter counts, shapes counted by
hand, torch's own ZeroRedundancyOptimizer and fully_shard partitions (on a fake 8-rank process group), and the
bytes autograd really saves (CPU autocast). Not in here: anything that needs a GPU or a cluster.
"""
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import fields

import numpy as np
import pytest
import torch

import checkpoint
import data
from conftest import ROOT, tiny_run
from configs import PRESETS, TrainConfig, to_json
from model import GPT, GPTConfig
from train import parse_config


def load_script(name: str):
    """scripts/ is not a package: load one script as a module, without putting scripts/ on sys.path."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


memory_estimate = load_script("memory_estimate")
SBATCH, PYTORCHJOB = ROOT / "scripts" / "slurm.sbatch", ROOT / "scripts" / "k8s-pytorchjob.yaml"


# ----------------------------------------------------------------------------- cluster files

def load_pytorchjob() -> dict:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (it comes with wandb): cannot parse the YAML")
    return yaml.safe_load(PYTORCHJOB.read_text())


def train_args_after(command: str) -> list[str]:
    """The train.py arguments of a shell command line, without the pass-through "$@"."""
    words = shlex.split(command.replace("\\\n", " "))
    return [w for w in words[words.index("train.py") + 1:] if w not in ("&", "$@")]


def test_sbatch_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_pytorchjob_has_a_master_and_workers_that_agree():
    job = load_pytorchjob()
    assert job["kind"] == "PyTorchJob" and job["apiVersion"] == "kubeflow.org/v1"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    assert replicas["Master"]["template"] == replicas["Worker"]["template"]  # one pod, two roles
    pod = replicas["Master"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["name"] == "pytorch"  # the name the training operator looks for
    command = " ".join(container["args"])
    nodes = replicas["Master"]["replicas"] + replicas["Worker"]["replicas"]
    assert f"--nnodes={nodes}" in command and "--rdzv_backend=c10d" in command
    assert f"--nproc_per_node={container['resources']['limits']['nvidia.com/gpu']}" in command
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert any(m["mountPath"] == "/dev/shm" and m["name"] == "dshm" for m in container["volumeMounts"])
    assert any("persistentVolumeClaim" in v for v in pod["volumes"])


def test_recipes_pass_flags_train_py_accepts():
    if "fsdp_reshard_after_forward" not in {f.name for f in fields(TrainConfig)}:
        pytest.skip("train.py has no --fsdp-reshard-after-forward yet (the --dist fsdp work is still landing)")
    srun = re.search(r"^srun .*?\"\$@\"", SBATCH.read_text(), re.S | re.M).group(0)
    slurm = parse_config(train_args_after(srun))
    k8s = parse_config(train_args_after(" ".join(load_pytorchjob()["spec"]["pytorchReplicaSpecs"]["Master"]
                                                 ["template"]["spec"]["containers"][0]["args"])))
    assert slurm.preset == k8s.preset == "gpt2-small" and slurm.resume == k8s.resume == "auto"
    assert slurm.dist == "zero1" and k8s.dist == "fsdp" and k8s.fsdp_reshard_after_forward is False


# ----------------------------------------------------------------------------- memory estimate: counts

@pytest.mark.parametrize("preset,params,width,layers", [("gpt2-small", 124_439_808, 768, 12),
                                                         ("gpt2-medium", 354_823_168, 1024, 24)])
def test_counts_match_gpt2(preset, params, width, layers):
    counts = memory_estimate.model_counts(PRESETS[preset][1].model, 8)
    h, V, s = width, 50257, 1024
    assert counts["P"] == params  # Hugging Face's count: position embeddings in, tied wte/lm_head once
    assert counts["Pb"] == 12 * h * h + 13 * h  # qkv 3h² + proj h² + mlp 8h², and 13h of biases and LayerNorm
    assert counts["Pr"] == V * h + s * h + 2 * h  # wte, wpe, ln_f
    assert counts["W"] == layers * 12 * h * h + 50304 * h  # every Linear weight, lm_head (= wte, padded rows) included


def test_partitions_match_torch_zero_and_fsdp():
    """Our partition arithmetic against torch's own, on 8 fake ranks: no processes, no memory (meta tensors)."""
    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model_cfg = PRESETS["gpt2-small"][1].model
    model = memory_estimate.meta_model(model_cfg)
    counts = memory_estimate.model_counts(model_cfg, 8)
    torch.distributed.init_process_group("fake", store=fake_pg.FakeStore(), rank=0, world_size=8)
    try:
        params = list(model.parameters())
        groups = [{"params": [p for p in params if p.dim() >= 2]}, {"params": [p for p in params if p.dim() < 2]}]
        zero = ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, lr=1e-3)
        per_rank = [sum(p.numel() for group in rank for p in group["params"]) for rank in zero._partition_parameters()]
        assert counts["zero1_rank"] == max(per_rank) == 50304 * 768  # wte (padded to 50304 rows) alone fills one rank
        mesh = init_device_mesh("cpu", (8,))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert counts["fsdp_shard"] == sum(p.to_local().numel() for p in model.parameters())  # rank 0: the fullest
    finally:
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- memory estimate: the modes

def estimates(preset="gpt2-small", world_size=8):
    cfg = PRESETS[preset][1]
    counts = memory_estimate.model_counts(cfg.model, world_size)
    return {(mode, reshard): memory_estimate.estimate(cfg, counts, world_size, mode, reshard)
            for mode, reshard in memory_estimate.TABLE_MODES}, counts


def test_sharding_divides_what_it_should():
    rows, n = estimates()
    ddp, zero1 = rows[("ddp", False)], rows[("zero1", False)]
    zero2, zero3 = rows[("fsdp", False)], rows[("fsdp", True)]
    assert ddp["optimizer"] == 8 * 124_439_808  # two fp32 AdamW moments
    assert zero1["optimizer"] == 8 * 50304 * 768 >= ddp["optimizer"] / 8  # whole tensors: wte's rank is the fullest
    assert {k: v for k, v in zero1.items() if k not in ("optimizer", "total")} == \
           {k: v for k, v in ddp.items() if k not in ("optimizer", "total")}
    assert zero2["optimizer"] == zero3["optimizer"] == 8 * n["fsdp_shard"] < 1.01 * ddp["optimizer"] / 8
    assert zero3["parameters"] == 4 * (n["fsdp_shard"] + n["Pr"] + n["Pb"])  # shard + root group + one block
    assert zero3["parameters"] < 1.01 * ddp["parameters"] / 8 + 4 * (n["Pr"] + n["Pb"])
    assert zero2["parameters"] == 4 * (n["fsdp_shard"] + n["P"])  # every block gathered until its backward
    assert ddp["gradients"] == 2 * 4 * n["P"]  # param.grad and DDP's bucket copy
    assert ddp["activations"] == zero1["activations"] == zero2["activations"] == zero3["activations"]
    assert ddp["total"] >= zero1["total"] >= zero2["total"] >= zero3["total"]


def saved_for_backward(model_cfg: GPTConfig, batch: int, precision: str) -> int:
    """Bytes of the distinct tensors autograd saves in one forward (parameters themselves excluded)."""
    torch.manual_seed(0)
    model = GPT(model_cfg).train()
    parameter_storage = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storage:
            saved[storage.data_ptr()] = storage.nbytes()  # by storage: views of one tensor count once
        return tensor

    tokens = torch.randint(0, model_cfg.vocab_size, (batch, model_cfg.block_size))
    autocast = torch.autocast("cpu", dtype=torch.float16, enabled=precision == "fp16")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        model(tokens, tokens)
    return sum(saved.values())


@pytest.mark.parametrize("attn_impl,upcast,precision", [("naive", True, "fp16"), ("naive", False, "fp16"),
                                                        ("sdpa", True, "fp16"), ("naive", True, "fp32")])
def test_activation_formula_matches_what_autograd_saves(attn_impl, upcast, precision):
    """Dropout 0 only: on CPU, dropout masks are full-width and sdpa falls back to its math path with dropout."""
    model_cfg = GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=4, n_embd=128, dropout=0.0,
                          attn_impl=attn_impl, upcast_attn=upcast)
    parts = memory_estimate.activation_bytes(model_cfg, 2, precision)
    copies = memory_estimate.model_counts(model_cfg, 1)["W"] * 2 if precision == "fp16" else 0
    expected = copies + sum(v for k, v in parts.items() if k != "logits held, cross-entropy gradients")
    measured = saved_for_backward(model_cfg, 2, precision)
    assert abs(measured - expected) < 0.02 * expected, (measured, expected)  # the rest: O(1/h) terms left out


def test_all_prints_the_readme_table(capsys):
    memory_estimate.main(["--all"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| preset | --dist |") and len(lines) == 2 + 2 * 4
    assert lines[2].startswith("| gpt2-small | ddp |") and lines[-1].startswith("| gpt2-medium | fsdp, reshard True |")


# ----------------------------------------------------------------------------- two torchrun "nodes" on one machine

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_nodes(tmp_path, configs, nproc: int = 1) -> tuple[list[int] | None, str]:
    """Two torchrun "nodes" of nproc processes each meeting at one rendezvous endpoint, node i with configs[i]:
    their exit codes (None if they ran past 3 minutes) and their logs."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    nodes, logs = [], []
    for node_rank in (0, 1):  # c10d ignores --node_rank's order: whichever joins first may get global rank 0
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--nproc_per_node={nproc}",
                   f"--node_rank={node_rank}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                   f"--rdzv_id=test-{port}", "train.py", str(configs[node_rank])]
        logs.append(open(tmp_path / f"node{node_rank}.log", "w"))
        nodes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=logs[-1], stderr=subprocess.STDOUT,
                                      start_new_session=True))  # its own process group: killable with its ranks
    try:
        deadline = time.monotonic() + 180
        codes = [node.wait(timeout=max(1.0, deadline - time.monotonic())) for node in nodes]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for node, log in zip(nodes, logs):
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
            log.close()
    return codes, "\n".join((tmp_path / f"node{r}.log").read_text() for r in (0, 1))


def test_two_nodes_by_c10d_rendezvous_train_and_checkpoint(tiny_data, tmp_path):
    """The multi-node torchrun command, as two single-process "nodes" meeting at one rendezvous endpoint."""
    out_dir, config = tmp_path / "run", tmp_path / "tiny.json"
    config.write_text(json.dumps(to_json(tiny_run(tiny_data, out_dir, max_steps=6))))
    codes, output = two_nodes(tmp_path, [config, config])
    assert codes == [0, 0], output
    ckpt = checkpoint.latest_complete(out_dir)  # written by global rank 0, on either "node"
    assert ckpt is not None and checkpoint.load(ckpt)["step"] == 6, output
    assert len(checkpoint.load(ckpt)["per_rank"]) == 2  # both ranks took part


def test_two_nodes_with_differently_prepared_data_are_refused(tiny_data, tmp_path):
    """Each node's local rank 0 checks its own copy; copies that each pass but hold other tokens (here one val
    token changed and meta.json made to match) would train the ranks on different data: refused on both nodes,
    one line per node (2 ranks each)."""
    other = tmp_path / "other-data"
    shutil.copytree(tiny_data, other)
    tokens = np.fromfile(other / "val.bin", dtype=np.uint16)
    tokens[-1] = (tokens[-1] + 1) % 512
    tokens.tofile(other / "val.bin")
    meta = json.loads((other / "meta.json").read_text())
    shard = meta["splits"]["val"]["shards"][0]
    shard.update(sha256=data.sha256_file(other / "val.bin"), fingerprint=data.fingerprint(other / "val.bin"))
    (other / "meta.json").write_text(json.dumps(meta))
    configs = []
    for node, data_dir in enumerate((tiny_data, other)):
        configs.append(tmp_path / f"node{node}.json")
        run = tiny_run(data_dir, tmp_path / "run", max_steps=6, micro_batch_size=2)  # 4 ranks × 2 = 8
        configs[-1].write_text(json.dumps(to_json(run)))
    codes, output = two_nodes(tmp_path, configs, nproc=2)
    assert codes is not None and 0 not in codes, output
    assert output.count("node holds other prepared data than rank") == 2, output
    assert not (tmp_path / "run" / "checkpoints").exists()
    # a copy that fails its own check: its node says why, the other node that that rank rejected the data
    (other / "meta.json").write_text((tiny_data / "meta.json").read_text())
    codes, output = two_nodes(tmp_path, configs, nproc=2)
    assert codes is not None and 0 not in codes, output
    assert output.count("val.bin: fingerprint differs from meta.json") == 2, output
    assert output.count("rejected the data: ") == 1, output


def test_two_nodes_in_different_precisions_are_refused(tiny_data, tmp_path):
    """--precision auto decides by each node's own device: nodes that chose differently are refused before any
    training, one line per node (here the choices are given outright: fp32 on one node, bf16 on the other)."""
    runs = [tiny_run(tiny_data, tmp_path / "run", precision=precision, micro_batch_size=2)  # 4 ranks × 2 = 8
            for precision in ("fp32", "bf16")]
    refused_once_per_node(tmp_path, runs, "gust: error: --precision: rank 0 trains in ")
    assert not (tmp_path / "run" / "checkpoints").exists()


def refused_once_per_node(tmp_path, runs, message: str):
    """Two nodes of 2 ranks each, node i given runs[i]: every rank fails, and message is said once per node."""
    configs = [tmp_path / f"node{node}.json" for node in range(len(runs))]
    for config, run in zip(configs, runs):
        config.write_text(json.dumps(to_json(run)))
    codes, output = two_nodes(tmp_path, configs, nproc=2)
    assert codes is not None and 0 not in codes, output
    assert output.count(message) == 2, output


def test_two_nodes_that_would_resume_from_different_checkpoints_are_refused(tiny_data, tmp_path):
    """A run directory that is not on a filesystem both nodes see: node 0's holds the step-5 checkpoint, node 1's
    none. Refused before any step, one line per node (2 ranks each), and nothing written to the empty one."""
    trained, config = tmp_path / "trained", tmp_path / "first.json"
    config.write_text(json.dumps(to_json(tiny_run(tiny_data, trained, max_steps=5))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    subprocess.run([sys.executable, "train.py", str(config)], cwd=ROOT, env=env, check=True, capture_output=True,
                   timeout=120)
    runs = [tiny_run(tiny_data, out_dir, micro_batch_size=2, resume="auto")  # 4 ranks × 2 = 8
            for out_dir in (trained, tmp_path / "empty")]
    refused_once_per_node(tmp_path, runs, "ranks disagree on the checkpoint to resume (steps -1 to 5; -1 = none)")
    assert not (tmp_path / "empty" / "checkpoints").exists()


def test_under_torchrun_a_refused_config_is_said_once_per_node_not_per_rank(tiny_data, tmp_path):
    """Every rank parses the same command line and checks the same config: one warning, one refusal (2 ranks)."""
    old = to_json(tiny_run(tiny_data, tmp_path / "run"))  # global batch 8 = micro 4 × 2 ranks
    del old["model"]["vocab_multiple"]  # written before the field existed: a warning
    config = tmp_path / "old.json"
    config.write_text(json.dumps(old))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    for flags, refusal in ((["--micro-batch-size", "8"], "is not divisible by --micro-batch-size 8 × world size 2"),
                           (["--optim.min-lr", "0.01"], "optim.min_lr (--optim.min-lr) = 0.01 is above")):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "train.py", str(config), *flags], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode != 0 and proc.stderr.count(refusal) == 1, proc.stderr[-3000:]
        assert proc.stderr.count("has no model.vocab_multiple") == (1 if "--micro-batch-size" in flags else 0)
    assert not (tmp_path / "run").exists()
