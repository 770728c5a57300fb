"""Move GPT-2 weights between gust and Hugging Face: `python hf_bridge.py export|import` (see --help).

export writes a directory `transformers.GPT2LMHeadModel.from_pretrained` loads: config.json, model.safetensors
and the tokenizer files; import reads one (model.safetensors or pytorch_model.bin) into a gust GPT.
Not in here: evaluation (eval.py) or sampling (sample.py). transformers itself is never imported.
safetensors is an optional dependency, imported only where used: it is the weight format HF expects and
loads without unpickling anything.
"""
import json
import pickle
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import rundir
from errors import UserError, read_json, run_cli
from model import GPT, INIT_STD, LAYER_NORM_EPS, GPTConfig

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
"""HF's Conv1D stores these (in, out); our nn.Linear stores (out, in): they are transposed both ways."""
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")
"""Causal-mask buffers older HF checkpoints save beside the weights; gust builds its mask on the fly."""


# ----------------------------------------------------------------------------- configs

EXPORT_MARK = "gust_export"  # in the config.json export writes: the one kind of non-empty --out it may overwrite
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")

def hf_config(cfg: GPTConfig, eot_id: int | None) -> dict:
    """config.json for a GPT2LMHeadModel with gust's shape and attention flags."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", EXPORT_MARK: True,  # a re-export may replace it
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,  # n_ctx: older readers
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": "gelu_new",  # the tanh approximation gust's MLP uses
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS, "initializer_range": INIT_STD, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": cfg.scale_attn_by_layer_idx,
        "reorder_and_upcast_attn": cfg.upcast_attn,  # HF honours it only on its eager attention path
        "tie_word_embeddings": True, "use_cache": True, "bos_token_id": eot_id, "eos_token_id": eot_id,
    }


def gpt_config(hf: dict, where: Path) -> GPTConfig:
    """The GPTConfig of an HF GPT-2 config.json, or a one-line error naming what gust cannot represent."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{where}: model_type {hf['model_type']!r} — only GPT-2 checkpoints can be imported")
    shape = {key: hf.get(key, default) for key, default in
             (("n_positions", 1024), ("vocab_size", 50257), ("n_layer", 12), ("n_head", 12), ("n_embd", 768))}
    n_embd = shape["n_embd"]
    unsupported = {
        "activation_function": (hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
                                "gust's MLP is GELU with the tanh approximation"),
        "n_inner": (hf.get("n_inner") in (None, 4 * n_embd), "gust's MLP is 4 × n_embd wide"),
        "layer_norm_epsilon": (hf.get("layer_norm_epsilon", 1e-5) == LAYER_NORM_EPS,  # 1e-5: HF's default
                               f"gust's LayerNorm uses eps {LAYER_NORM_EPS}"),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), "gust always divides scores by √head_size"),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", True), "gust ties lm_head to wte"),
        "add_cross_attention": (not hf.get("add_cross_attention", False), "gust is decoder-only"),
    }
    for key, (ok, why) in unsupported.items():
        if not ok:
            raise UserError(f"{where}: {key} = {hf.get(key)!r} cannot be imported — {why}")
    bad = next((key for key, value in shape.items() if type(value) is not int or value < 1), None)
    if bad:  # checked here, so that the line names config.json, not GPTConfig's train.py flags
        raise UserError(f"{where}: {bad} = {shape[bad]!r} is not a positive integer")
    if n_embd % shape["n_head"]:
        raise UserError(f"{where}: n_embd {n_embd} is not divisible by n_head {shape['n_head']}")
    return GPTConfig(block_size=shape["n_positions"], vocab_size=shape["vocab_size"], n_layer=shape["n_layer"],
                     n_head=shape["n_head"], n_embd=n_embd,
                     dropout=hf.get("resid_pdrop", 0.1),  # gust has one dropout; GPT-2's three are equal
                     bias=True, upcast_attn=hf.get("reorder_and_upcast_attn", False),
                     scale_attn_by_layer_idx=hf.get("scale_attn_by_inverse_layer_idx", False))


# ----------------------------------------------------------------------------- weights

def to_hf_state(model: GPT) -> dict[str, torch.Tensor]:
    """gust's state_dict in HF's layout: Conv1D weights transposed, lm_head left out (HF re-ties it)."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # the same tensor as wte; safetensors refuses to store shared memory twice
        if name == "transformer.wte.weight":
            tensor = tensor[:model.config.vocab_size]  # HF holds exactly the tokenizer's rows, not gust's padding
        state[name] = (tensor.t() if name.endswith(CONV1D) else tensor).detach().float().contiguous()
    if not model.config.bias:  # GPT-2 always has biases; zeros compute exactly what bias=False does
        with torch.device("meta"):  # names and shapes only, no memory
            with_biases = GPT(replace(model.config, bias=True)).state_dict()
        for name, tensor in with_biases.items():
            if name != "lm_head.weight":
                state.setdefault(name, torch.zeros(tensor.shape))
    return state


def from_hf_state(hf_state: dict[str, torch.Tensor], cfg: GPTConfig, where: Path) -> GPT:
    """A gust GPT holding HF weights (GPT2LMHeadModel's or GPT2Model's key names); GPT.load_state_dict adds
    the vocabulary's padding rows (zeros) to HF's vocab_size rows."""
    state = {}
    for name, tensor in hf_state.items():
        if name.endswith(HF_BUFFERS):
            continue
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name  # GPT2Model (e.g. the hub's original gpt2) saves without the prefix
        state[name] = (tensor.t() if name.endswith(CONV1D) else tensor).float()
    wte = state["transformer.wte.weight"]
    lm_head = state.setdefault("lm_head.weight", wte)
    if not torch.equal(lm_head, wte):
        raise UserError(f"{where}: lm_head.weight differs from transformer.wte.weight — gust ties them")
    model = GPT(cfg)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    wrong = next(((name, tuple(tensor.shape), shapes[name]) for name, tensor in state.items()  # wte: padded here
                  if name in shapes and name not in ("transformer.wte.weight", "lm_head.weight")
                  and tuple(tensor.shape) != shapes[name]), None)
    if wrong is not None:  # load_state_dict would raise a RuntimeError page about it
        raise UserError(f"{where}: weights do not fit config.json ({wrong[0]} is {wrong[1]}, config.json's shape "
                        f"makes it {wrong[2]})")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{where}: weights do not fit config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """model.safetensors if present, else pytorch_model.bin (loaded with weights_only=True)."""
    if (hf_dir / "model.safetensors").is_file():
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserError(f"{hf_dir}/model.safetensors needs the safetensors package — pip install safetensors") from None
        return load_file(str(hf_dir / "model.safetensors"))
    if (hf_dir / "pytorch_model.bin").is_file():
        try:
            return torch.load(hf_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:  # weights_only refused an object: one line, not torch's page
            found = re.search(r"GLOBAL (\S+)", str(err))  # the class torch refused, when it names one
            raise UserError(f"{hf_dir}/pytorch_model.bin: refused by torch.load(weights_only=True) — it holds pickled "
                            f"objects ({found.group(1) if found else 'not tensors'}); load only weights you trust, "
                            "or convert them to model.safetensors") from None
    if (hf_dir / "model.safetensors.index.json").is_file():
        raise UserError(f"{hf_dir}: sharded weights (model.safetensors.index.json) are not supported — "
                        "re-save with a larger max_shard_size")
    raise UserError(f"{hf_dir}: no model.safetensors or pytorch_model.bin — is this a Hugging Face model directory?")


def import_hf(hf_dir: Path) -> GPT:
    """A gust GPT from a Hugging Face GPT-2 directory (config.json + weights), in eval mode."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"{hf_dir}/config.json: missing — is this a Hugging Face model directory?")
    hf = read_json(hf_dir / "config.json")
    if not isinstance(hf, dict):
        raise UserError(f"{hf_dir / 'config.json'}: not a JSON object — is this a Hugging Face model directory?")
    cfg = gpt_config(hf, hf_dir / "config.json")
    return from_hf_state(read_hf_weights(hf_dir), cfg, hf_dir)


# ----------------------------------------------------------------------------- export

def export_hf(source: "GPT | Path", out_dir: Path, data_dir: Path | None = None) -> Path:
    """Write config.json, model.safetensors and (given a data dir) the tokenizer files into out_dir.

    source is a GPT or a checkpoint directory; a checkpoint's own data dir is used when data_dir is None.
    """
    from checkpoint import find_checkpoint, load_gust

    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UserError("export needs the safetensors package (the format Hugging Face loads) — "
                        "pip install safetensors") from None
    if not isinstance(source, GPT):
        source, state = load_gust(find_checkpoint(Path(source), None))  # a run directory: one line saying so
        data_dir = data_dir or Path(state["config"]["data"]["dir"])
    out_dir = Path(out_dir)
    refuse_run_dir(out_dir)
    tokenizer_files = find_tokenizer_files(data_dir) if data_dir else None  # a bad data dir is refused before mkdir
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a directory above it is a file
        raise UserError(f"--out {out_dir}: a file is in the way — choose another --out") from None
    for name in TOKENIZER_FILES:  # an earlier export's tokenizer may be another kind: none of it stays
        (out_dir / name).unlink(missing_ok=True)
    eot_id = write_tokenizer_files(tokenizer_files, out_dir, source.config.block_size) if data_dir else None
    save_file(to_hf_state(source), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config(source.config, eot_id), indent=2))
    return out_dir


def find_tokenizer_files(data_dir: Path) -> tuple[dict, dict[str, Path]]:
    """The data dir's meta.json and {name in HF's layout: file to copy}; a one-line error if any is missing."""
    from data import read_meta
    from tokenizer import find_gpt2_files

    meta = read_meta(data_dir)
    if meta["tokenizer"]["kind"] == "bpe":
        tokenizer_json = Path(data_dir) / "tokenizer.json"
        if not tokenizer_json.is_file():
            raise UserError(f"{tokenizer_json}: missing — prepare the data again with `python data.py prepare`")
        return meta, {"tokenizer.json": tokenizer_json}
    vocab, merges = find_gpt2_files(Path(meta["tokenizer"]["vocab_dir"]))
    return meta, {"vocab.json": vocab, "merges.txt": merges}


def write_tokenizer_files(tokenizer_files: tuple[dict, dict[str, Path]], out_dir: Path, block_size: int) -> int:
    """Copy find_tokenizer_files' files into out_dir with HF's tokenizer_config.json; returns <|endoftext|>'s id."""
    from tokenizer import EOT

    meta, files = tokenizer_files
    for name, source in files.items():
        shutil.copyfile(source, out_dir / name)
    # PreTrainedTokenizerFast reads tokenizer.json as it is; GPT2Tokenizer reads vocab.json + merges.txt
    tokenizer_class = "PreTrainedTokenizerFast" if "tokenizer.json" in files else "GPT2Tokenizer"
    tokenizer_config = {"tokenizer_class": tokenizer_class, "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
                        "add_prefix_space": False, "model_max_length": block_size}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return meta["eot_id"]


# ----------------------------------------------------------------------------- command line

@dataclass
class ExportArgs:
    """Write a gust checkpoint as a Hugging Face GPT-2 directory."""

    checkpoint: Path
    """Checkpoint directory (runs/<name>/checkpoints/step-XXXXXXX)."""
    out: Path
    """Directory to write config.json, model.safetensors and the tokenizer files into."""
    data_dir: Path | None = None
    """Prepared data dir whose tokenizer to ship (default: the checkpoint's own --data.dir)."""


@dataclass
class ImportArgs:
    """Read a Hugging Face GPT-2 directory into a gust run directory (one checkpoint, step 0)."""

    hf_dir: Path
    """Directory holding config.json and model.safetensors or pytorch_model.bin."""
    out: Path
    """Run directory to create (missing or empty); the checkpoint goes to OUT/checkpoints/step-0000000."""
    data_dir: Path = Path("data/openwebtext")
    """Prepared data dir recorded as the run's --data.dir (its tokenizer is what sample.py and eval.py use)."""


def refuse_a_file(out: Path):
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a directory — choose a new --out")


def refuse_run_dir(out: Path):
    """export's check: out must be missing, empty, or an earlier export (its config.json says so), which the new one
    replaces; never a gust run (export would replace its config.json) or another model's directory."""
    refuse_a_file(out)
    held = [name for name in ("metrics.jsonl", "checkpoints") if (out / name).exists()]
    if held:
        raise UserError(f"--out {out}: holds a gust run ({', '.join(held)}) — export into a directory of its own")
    if out.is_dir() and any(out.iterdir()) and not earlier_export(out):
        raise UserError(f"--out {out}: not empty, and no earlier gust export (its config.json has no "
                        f"{EXPORT_MARK!r}) — export into a new or empty directory")


def earlier_export(out: Path) -> bool:
    try:
        return json.loads((out / "config.json").read_text()).get(EXPORT_MARK) is True
    except (OSError, ValueError, AttributeError):  # missing, not JSON, not an object: not ours
        return False


def refuse_occupied(out: Path):
    """import's check: out must be missing or empty (but for a lock file): import makes a new run only."""
    refuse_a_file(out)
    held = sorted(path.name for path in out.iterdir() if path.name != rundir.LOCK) if out.is_dir() else []
    if held:
        raise UserError(f"--out {out}: not empty (holds {', '.join(held[:3])}{', …' if len(held) > 3 else ''}) — "
                        "import writes a new run: choose a new or empty --out")


def check_tokenizer_fits(data_dir: Path, model_vocab: int):
    """--data-dir's tokenizer is what sample.py and eval.py will use with the imported weights: it must be there,
    and its ids must be the model's (a model may carry a few padding rows more, as nanoGPT's 50304 for 50257)."""
    from data import read_meta

    vocab = read_meta(data_dir).get("vocab_size")
    if not isinstance(vocab, int) or not vocab <= model_vocab < vocab + 128:
        raise UserError(f"--data-dir {data_dir}: its tokenizer has {vocab} tokens, the model {model_vocab} — pass the "
                        "data dir prepared with this model's tokenizer (GPT-2's: --tokenizer gpt2)")


def import_to_run(args: ImportArgs) -> Path:
    """import_hf, then, holding the run directory's lock, config.json and checkpoint.save with a TrainConfig
    describing the imported shape. Refuses a directory that holds anything (it would become a run's)."""
    import checkpoint
    from configs import DataConfig, TrainConfig, to_json
    from data import write_json_atomic

    refuse_occupied(args.out)
    model = import_hf(args.hf_dir)  # reads and checks every input before the directory is created or locked
    check_tokenizer_fits(args.data_dir, model.config.vocab_size)
    cfg = TrainConfig(preset="hf-import", model=model.config, data=DataConfig(dir=args.data_dir), out_dir=args.out)
    state = {"model": model.state_dict(), "config": to_json(cfg), "step": 0, "source": str(args.hf_dir)}
    with rundir.holding(args.out):  # one writer, as train.py: a run started meanwhile holds it or sees ours
        refuse_occupied(args.out)  # again under the lock: another writer may have filled it since the first look
        write_json_atomic(args.out / "config.json", to_json(cfg))
        return checkpoint.save(args.out, 0, state, keep=True, keep_last=0)


def main(argv: list[str] | None = None):
    import tyro

    args = tyro.extras.subcommand_cli_from_dict({"export": ExportArgs, "import": ImportArgs}, args=argv,
                                                prog="hf_bridge.py")
    if isinstance(args, ExportArgs):
        print(f"wrote {export_hf(args.checkpoint, args.out, args.data_dir)}")
    else:
        print(f"wrote {import_to_run(args)}")


if __name__ == "__main__":
    run_cli(main)
