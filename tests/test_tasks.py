"""eval.py's benchmarks (HellaSwag, LAMBADA, WikiText-103) against plain per-example loops over Hugging Face's GPT-2.

The files are written here in the real formats (no downloads); the model is a random tiny GPT2LMHeadModel with
GPT-2's real 50257-token BPE (.cache/gpt2), scored once by transformers itself, token by token, and once by
eval.py through hf_bridge. The detokeniser is checked on real WikiText idioms, against strings written by hand.
"""
import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import eval as gust_eval  # "eval" the module, not the builtin
import hf_bridge
import plot
from conftest import GPT2_VOCAB, eval_on_two_ranks, tiny_run
from errors import UserError

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
BLOCK = 32  # small: the long examples below must be left-truncated

HELLASWAG = [  # the public jsonl's fields (ctx, endings without a leading space, label); extra fields are ignored
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx": "A man is sitting on a roof. He",
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "label": 3},
    {"ctx": "A woman is outside with a bucket and a dog. The dog is running around trying to avoid a bath. She",
     "endings": ["rinses the bucket off with soap and blow dry the dog's head.",
                 "uses a hose to keep it from getting soapy.", "gets the dog wet, then it runs away again.",
                 "gets into a bath tub with the dog."], "label": 2},
    {"ctx": "Then, the man writes over the snow covering the window of a car, and a woman wearing winter clothes "
            "smiles. Then, the man continues removing the snow on his car while the woman watches and laughs "
            "for a long time at the window. Then",  # longer than the block: left-truncated
     "endings": ["the man drives off.", "the woman laughs, covering her face with both hands in disbelief.",
                 "a dog runs.", "it snows."], "label": "0"},  # the HF datasets copy stores labels as strings
    {"ctx": "A cat sits by the window. It", "endings": ["sleeps.", "watches the birds outside for hours.",
                                                          "jumps.", "eats a sandwich with a fork and knife."], "label": 1},
    {"ctx": "The chef slices onions", "endings": ["quickly.", "and cries.", "into thin rings for the salad.",
                                                  "on a wooden board."], "label": 2},
    {"ctx": "A boy throws a ball. The dog", "endings": ["runs.", "chases it across the yard.", "barks.", "sits."],
     "label": 0},
    {"ctx": "Two men are playing chess in a park. One", "endings": ["wins.", "moves a knight.", "laughs.",
                                                                   "takes the queen with a pawn."], "label": 3},
]
LAMBADA = [  # OpenAI's variant: one passage per line, the target is its last word
    "In my palm is a clear stone, and inside it is a small ivory statuette. A guardian angel. "
    "Figured if you're going to be out at night getting hit by cars, you might as well have some backup. "
    "I look at him, feeling stunned. Like this is some sort of sign. But as I stare at Harlin, his mouth curved "
    "in a confident grin, I don't care about signs",  # longer than the block
    "Give me a minute to change and I'll meet you at the docks. She'd forced those words through her teeth. "
    "I'll meet you at the docks",
    "The dog barked at the mailman every single morning, and every morning the mailman waved at the dog",
    "He poured the coffee into two cups and handed one to the old wizard, who muttered abracadabra",  # 4 tokens
]
WIKITEXT = (  # wiki.test.raw's format: headings, " @-@ ", " @,@ ", spaced punctuation, blank lines
    " \n = Robert Boulter = \n \n Robert Boulter is an English film , television and theatre actor . He had a "
    "guest @-@ starring role on the television series The Bill in 2000 . This was followed by a starring role in "
    "the play Herons written by Simon Stephens , which was performed in 2001 at the Royal Court Theatre . \n \n"
    " = = Career = = \n \n = = = 2000 – 2005 = = = \n \n In 2000 Boulter had a guest @-@ starring role on the "
    "television series The Bill ; he portrayed \" Scott Parry \" in the episode , \" In Safe Hands \" . The film "
    "earned $ 1 @,@ 500 @,@ 000 ( about 3 @.@ 5 % of its budget ) in the players ' home town . \n")


# ----------------------------------------------------------------------------- fixtures: files and a model

@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("benchmarks")
    paths = {"hellaswag": root / "hellaswag_val.jsonl", "lambada": root / "lambada_test.jsonl",
             "wikitext": root / "wiki.test.raw"}
    paths["hellaswag"].write_text("".join(json.dumps(row) + "\n" for row in HELLASWAG))
    paths["lambada"].write_text("".join(json.dumps({"text": text}) + "\n" for text in LAMBADA))
    paths["wikitext"].write_text(WIKITEXT)
    return paths


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(HF dir with GPT-2's tokenizer files, the GPT2LMHeadModel it holds, transformers' own GPT-2 tokenizer)."""
    if not (GPT2_VOCAB / "vocab.json").is_file():
        pytest.skip(f"{GPT2_VOCAB} missing: run `make setup`")
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(3)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # far from uniform predictions: the endings' scores differ clearly
            p.add_(torch.randn_like(p) * 0.2)
    hf_dir = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    model.save_pretrained(hf_dir)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(GPT2_VOCAB / name, hf_dir / name)
    tokenizer = transformers.GPT2TokenizerFast.from_pretrained(hf_dir)  # transformers' own reading of the files
    return hf_dir, model, tokenizer


# ----------------------------------------------------------------------------- the references: one example at a time

def reference_continuation(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """Summed log-probability of continuation's tokens after context's, and whether greedy decoding gets all of
    them; the context keeps only its last BLOCK + 1 - len(continuation) tokens when the whole does not fit."""
    return reference_ids(model, tokenizer(context)["input_ids"], tokenizer(continuation)["input_ids"])


def reference_ids(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    keep = min(len(ctx), BLOCK + 1 - len(cont))
    inputs = ctx[len(ctx) - keep:] + cont[:-1]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([inputs])).logits[0].double(), dim=-1)  # (len(inputs), V)
    total, greedy = 0.0, True
    for j, token in enumerate(cont):
        position = keep - 1 + j  # the position whose output predicts cont[j]
        total += logprobs[position, token].item()
        greedy = greedy and int(logprobs[position].argmax()) == token
    return total, greedy


def reference_hellaswag(model, tokenizer) -> tuple[list[list[float]], float, float]:
    lls, correct, correct_norm = [], 0, 0
    for row in HELLASWAG:
        scores = [reference_continuation(model, tokenizer, row["ctx"], " " + ending)[0] for ending in row["endings"]]
        per_byte = [s / len(ending.encode("utf-8")) for s, ending in zip(scores, row["endings"])]
        correct += scores.index(max(scores)) == int(row["label"])
        correct_norm += per_byte.index(max(per_byte)) == int(row["label"])
        lls.append(scores)
    return lls, correct / len(HELLASWAG), correct_norm / len(HELLASWAG)


def reference_wikitext_nll(model, tokenizer, text: str, context: int, stride: int) -> tuple[float, int]:
    """Summed NLL of every token of <|endoftext|> + text, one forward per token: token t sees ids[s:t], s the
    first window start (a multiple of stride) with s + context ≥ t."""
    ids = [tokenizer.eos_token_id] + tokenizer(text)["input_ids"]
    nll = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):
            start = max(0, math.ceil((t - context) / stride)) * stride
            logits = model(torch.tensor([ids[start:t]])).logits[0, -1].double()
            nll -= torch.log_softmax(logits, -1)[ids[t]].item()
    return nll, len(ids) - 1


def run_eval(hf_dir: Path, *args) -> dict:
    return gust_eval.main(["--hf-dir", str(hf_dir), "--device", "cpu", "--batch-size", "3", *args])


# ----------------------------------------------------------------------------- scoring against the references

def test_hellaswag_matches_a_per_example_huggingface_loop(hf, files):
    hf_dir, model, tokenizer = hf
    lls, acc, acc_norm = reference_hellaswag(model, tokenizer)
    # the data can tell the conventions apart: per byte, per token and per byte counting the space pick differently
    per_token = [[s / len(tokenizer(" " + e)["input_ids"]) for s, e in zip(row_lls, row["endings"])]
                 for row_lls, row in zip(lls, HELLASWAG)]
    per_byte = [[s / len(e.encode()) for s, e in zip(row_lls, row["endings"])] for row_lls, row in zip(lls, HELLASWAG)]
    per_byte_and_space = [[s / (len(e.encode()) + 1) for s, e in zip(row_lls, row["endings"])]
                          for row_lls, row in zip(lls, HELLASWAG)]
    picks = [[r.index(max(r)) for r in scores] for scores in (per_byte, per_token, per_byte_and_space)]
    assert picks[0] != picks[1] and picks[0] != picks[2]
    assert 0 < acc < 1 and 0 < acc_norm < 1

    result = run_eval(hf_dir, "--task", "hellaswag", "--file", str(files["hellaswag"]))["tasks"]["hellaswag"]
    assert (result["acc"], result["acc_norm"], result["count"]) == (acc, acc_norm, len(HELLASWAG))
    lo, hi = result["acc_norm_ci95"]  # Wilson's interval, from its formula
    n, z = len(HELLASWAG), 1.959963984540054
    center, half = (acc_norm + z * z / (2 * n)) / (1 + z * z / n), z / (1 + z * z / n) * math.sqrt(
        acc_norm * (1 - acc_norm) / n + z * z / (4 * n * n))
    assert (lo, hi) == pytest.approx((center - half, center + half), abs=1e-12)

    task = gust_eval.HellaSwag.read(files["hellaswag"], gust_eval.hf_tokenizer(hf_dir, GPT2_VOCAB), BLOCK)
    scorer = gust_eval.Scorer(hf_bridge.import_hf(hf_dir), torch.device("cpu"), batch_size=5)
    ours = gust_eval.continuation_logprobs(scorer, task.requests)[:, 0].view(-1, 4)
    assert ours.flatten().tolist() == pytest.approx([ll for row in lls for ll in row], abs=1e-5)


def test_lambada_matches_a_per_example_huggingface_loop(hf, files):
    hf_dir, model, tokenizer = hf
    lls, greedy, n_tokens = [], [], 0
    for text in LAMBADA:
        context, word = text.rsplit(" ", 1)
        ll, all_greedy = reference_continuation(model, tokenizer, context, " " + word)
        lls.append(ll)
        greedy.append(all_greedy)
        n_tokens += len(tokenizer(" " + word)["input_ids"])
    result = run_eval(hf_dir, "--task", "lambada", "--file", str(files["lambada"]))["tasks"]["lambada"]
    assert result["acc"] == sum(greedy) / len(LAMBADA) and result["count"] == len(LAMBADA)
    assert result["target_tokens"] == n_tokens > len(LAMBADA)  # a word of several tokens: per word ≠ per token
    assert result["ppl"] == pytest.approx(math.exp(-sum(lls) / len(LAMBADA)), rel=1e-5)
    assert result["token_ppl"] == pytest.approx(math.exp(-sum(lls) / n_tokens), rel=1e-5)


def test_lambada_accuracy_counts_a_word_only_when_all_its_tokens_are_greedy(hf, tmp_path):
    """A passage whose target the model predicts: its own greedy continuation, cut at a word boundary."""
    hf_dir, model, tokenizer = hf
    prompt = "The dog barked at the mailman every single"
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        generated = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(ids):]
    text = prompt + tokenizer.decode(generated.tolist())
    context, word = text.rsplit(" ", 1)
    expected = reference_continuation(model, tokenizer, context, " " + word)[1]
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": text}) + "\n")
    result = run_eval(hf_dir, "--task", "lambada", "--file", str(tmp_path / "one.jsonl"))["tasks"]["lambada"]
    assert result["acc"] == float(expected)


def test_a_continuation_is_greedy_only_when_every_one_of_its_tokens_is(hf):
    hf_dir, model, tokenizer = hf
    context = tokenizer("The dog barked at the mailman every single")["input_ids"]

    def ranked_after(ids: list[int]) -> list[int]:  # next tokens, most likely first
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0, -1].argsort(descending=True).tolist()

    def greedy(ids: list[int], n: int) -> list[int]:
        for _ in range(n):
            ids = ids + ranked_after(ids)[:1]
        return ids[-n:]

    all_greedy = greedy(context, 3)
    second_best = ranked_after(context)[1]
    first_missed = [second_best] + greedy(context + [second_best], 2)  # the last two greedy, the first not
    last_missed = all_greedy[:2] + [ranked_after(context + all_greedy[:2])[1]]
    requests = [(context, cont) for cont in (all_greedy, first_missed, last_missed)]
    assert [reference_ids(model, *request)[1] for request in requests] == [True, False, False]
    scorer = gust_eval.Scorer(hf_bridge.import_hf(hf_dir), torch.device("cpu"), batch_size=2)
    assert gust_eval.continuation_logprobs(scorer, requests)[:, 1].tolist() == [1.0, 0.0, 0.0]


def test_wikitext_matches_token_by_token_huggingface_scoring(hf, files):
    hf_dir, model, tokenizer = hf
    text = gust_eval.wikitext_detokenize(WIKITEXT)
    nll, n_tokens = reference_wikitext_nll(model, tokenizer, text, context=BLOCK, stride=BLOCK // 2)
    result = run_eval(hf_dir, "--task", "wikitext", "--file", str(files["wikitext"]))["tasks"]["wikitext"]
    assert (result["context"], result["stride"]) == (BLOCK, BLOCK // 2)  # 1024 / 512, capped at the block size
    assert result["tokens_scored"] == n_tokens > 2 * BLOCK  # several windows
    n_words = len(WIKITEXT.split())  # words of the ORIGINAL file
    assert result["words"] == n_words
    assert result["token_ppl"] == pytest.approx(math.exp(nll / n_tokens), rel=1e-5)
    assert result["word_ppl"] == pytest.approx(math.exp(nll / n_words), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode("utf-8")), rel=1e-5)


# ----------------------------------------------------------------------------- the detokeniser and word counts

@pytest.mark.parametrize("raw,expected", [
    (" = Robert Boulter = \n", " = Robert Boulter =\n"),
    (" = = Career = = \n", " == Career ==\n"),
    (" = = = 2000 – 2005 = = = \n", " === 2000 – 2005 ===\n"),
    ("a guest @-@ starring role", "a guest-starring role"),
    ("$ 1 @,@ 500 @,@ 000", "$ 1,500,000"),
    ("about 3 @.@ 5 %", "about 3.5 %"),
    ("English film , television and theatre actor . He", "English film, television and theatre actor. He"),
    ("The Bill ; he portrayed \" Scott Parry \" in", "The Bill; he portrayed \"Scott Parry\" in"),
    ("budget ( about half ) in", "budget (about half) in"),
    ("the players ' home town", "the players' home town"),
    ("the film 's release : a", "the film's release: a"),
])
def test_wikitext_detokeniser_on_real_idioms(raw, expected):
    assert gust_eval.wikitext_detokenize(raw) == expected


def test_word_level_perplexity_divides_the_summed_loss_by_the_original_words(hf, tmp_path):
    """Two files whose detokenised texts are identical but whose original word counts differ by design."""
    hf_dir = hf[0]
    spaced, plain = "The cat sat on the mat , then left . \n", "The cat sat on the mat, then left.\n"
    assert gust_eval.wikitext_detokenize(spaced) == gust_eval.wikitext_detokenize(plain)
    results = {}
    for name, text in (("spaced", spaced), ("plain", plain)):
        (tmp_path / name).write_text(text)
        results[name] = run_eval(hf_dir, "--task", "wikitext", "--file", str(tmp_path / name))["tasks"]["wikitext"]
    assert (results["spaced"]["words"], results["plain"]["words"]) == (10, 8)  # counted by hand
    loss_sum = results["plain"]["loss"] * results["plain"]["tokens_scored"]  # the same model text: the same loss
    assert results["spaced"]["loss"] == pytest.approx(results["plain"]["loss"], rel=1e-12)
    assert results["spaced"]["word_ppl"] == pytest.approx(math.exp(loss_sum / 10), rel=1e-9)
    assert results["plain"]["word_ppl"] == pytest.approx(math.exp(loss_sum / 8), rel=1e-9)


# ----------------------------------------------------------------------------- ranks, results file, bad input

def test_two_gloo_ranks_report_what_one_rank_does_and_the_results_file_says_what_was_scored(hf, files, tmp_path):
    hf_dir = hf[0]
    specs = [f"{name}:{path}" for name, path in files.items()]
    args = ["--hf-dir", str(hf_dir), "--device", "cpu", "--batch-size", "3", "--context", "24", "--stride", "10",
            "--all-tasks", *specs]
    one = gust_eval.main([*args, "--out", str(tmp_path / "one.json")])
    two = eval_on_two_ranks(args, tmp_path / "two.json")
    assert two["eval"]["world_size"] == 2
    for name in files:
        for key, value in one["tasks"][name].items():
            expected = value if isinstance(value, str) else pytest.approx(value, rel=1e-9)
            assert two["tasks"][name][key] == expected, (name, key)

    written = json.loads((tmp_path / "one.json").read_text())
    assert written["tasks"] == json.loads(json.dumps(one["tasks"]))  # every number of the run
    for name, path in files.items():
        assert written["tasks"][name]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert written["model"]["kind"] == "huggingface"
    assert written["model"]["weights_sha256"] == hashlib.sha256((hf_dir / "model.safetensors").read_bytes()).hexdigest()
    assert written["model"]["config"]["n_positions"] == BLOCK
    assert set(written["tasks"]["hellaswag"]) >= {"acc", "acc_norm", "acc_ci95", "acc_norm_ci95", "count"}
    assert set(written["tasks"]["lambada"]) >= {"acc", "ppl", "token_ppl", "count"}
    assert set(written["tasks"]["wikitext"]) >= {"token_ppl", "word_ppl", "bits_per_byte", "words", "bytes"}


@pytest.mark.parametrize("task,content,culprit", [
    ("hellaswag", [HELLASWAG[0], {"ctx": "A man", "endings": ["a", "b", "c", "d"]}], r"hellaswag_val\.jsonl:2: no 'label'"),
    ("hellaswag", [HELLASWAG[0], HELLASWAG[1], dict(HELLASWAG[0], label=4)], r"hellaswag_val\.jsonl:3: label 4"),
    ("hellaswag", [], r"hellaswag_val\.jsonl: empty"),
    ("lambada", [{"text": LAMBADA[1]}, {"passage": LAMBADA[2]}], r"lambada_test\.jsonl:2: no 'text'"),
    ("lambada", [{"text": "Alone"}], r"lambada_test\.jsonl:1: \"text\" must be"),
    ("lambada", [], r"lambada_test\.jsonl: empty"),
    ("wikitext", " \n \n", r"wiki\.test\.raw: empty"),
])
def test_bad_benchmark_files_fail_in_one_line_naming_file_and_line(hf, tmp_path, task, content, culprit):
    name = {"hellaswag": "hellaswag_val.jsonl", "lambada": "lambada_test.jsonl", "wikitext": "wiki.test.raw"}[task]
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else "".join(json.dumps(row) + "\n" for row in content))
    with pytest.raises(UserError, match=culprit) as raised:
        run_eval(hf[0], "--task", task, "--file", str(path), "--out", str(tmp_path / "results.json"))
    assert "\n" not in str(raised.value) and str(path) in str(raised.value)
    assert not (tmp_path / "results.json").exists()


def test_bad_task_flags_fail_in_one_line(hf, files):
    with pytest.raises(UserError, match=r"--all-tasks 'hellaswg:.*': expected name:path"):
        run_eval(hf[0], "--all-tasks", f"hellaswg:{files['hellaswag']}")
    with pytest.raises(UserError, match=r"--task lambada needs --file"):
        run_eval(hf[0], "--task", "lambada")


def test_a_tokenizer_the_model_cannot_read_fails_in_one_line(tmp_path, files):
    small = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=300, n_positions=BLOCK, n_embd=16,
                                                                 n_layer=1, n_head=2))
    small.save_pretrained(tmp_path / "small")  # no tokenizer files: eval.py falls back to GPT-2's 50257 tokens
    with pytest.raises(UserError, match=r"lambada_test\.jsonl: token id \d+ >= the model's vocab_size 300"):
        run_eval(tmp_path / "small", "--gpt2-vocab-dir", str(GPT2_VOCAB), "--task", "lambada",
                 "--file", str(files["lambada"]))


# ----------------------------------------------------------------------------- in the training loop

def test_training_loop_logs_the_benchmarks_eval_py_reports_for_the_same_checkpoint(tiny_data, files, tmp_path):
    from model import GPTConfig
    from train import train

    specs = tuple(f"{name}:{path}" for name, path in files.items())
    cfg = tiny_run(tiny_data, tmp_path / "run", eval_tasks=specs, max_steps=4, eval_interval=2, eval_batches=2,
                   final_eval_batches=2,  # a block of 64: the 512-token BPE spells the longest ending in 30-odd tokens
                   model=GPTConfig(block_size=64, vocab_size=512, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "val_bpb" in row]
    assert [row["step"] for row in evals] == [2, 4]
    for key in ("hellaswag_acc", "hellaswag_acc_norm", "lambada_acc", "lambada_ppl", "wikitext_word_ppl",
                "wikitext_token_ppl", "wikitext_bits_per_byte"):
        assert all(key in row for row in evals), key
    # a second path to the same numbers: eval.py on the step-4 checkpoint, the run's tokenizer, one sequence a forward
    result = gust_eval.main(["--run-dir", str(tmp_path / "run"), "--device", "cpu", "--batch-size", "1",
                             "--all-tasks", *specs])["tasks"]
    last = evals[-1]
    for name, numbers in result.items():
        for key, value in numbers.items():
            if key not in ("file", "sha256"):
                assert last[f"{name}_{key}"] == pytest.approx(value, rel=1e-6), (name, key)


@pytest.mark.parametrize("n_batches,world_size", [(5, 2), (1, 2), (7, 3), (4, 4), (2, 3)])
def test_every_rank_runs_as_many_forwards_and_each_batch_is_scored_once(n_batches, world_size):
    """Under fsdp each forward gathers weights on every rank: a rank with fewer batches must still join."""
    rounds = [gust_eval.forward_rounds(n_batches, rank, world_size) for rank in range(world_size)]
    assert len({len(r) for r in rounds}) == 1 and len(rounds[0]) == -(-n_batches // world_size)
    assert sorted(i for r in rounds for i in r if i is not None) == list(range(n_batches))


def test_plot_draws_the_benchmark_panels_only_when_they_were_logged():
    train_rows = [{"step": 10, "loss": 3.0, "lr": 1e-3}]
    plain = [{"step": 10, "val_loss": 3.1, "val_bpb": 2.0}]
    with_tasks = [dict(plain[0], hellaswag_acc_norm=0.3, lambada_acc=0.2, wikitext_word_ppl=40.0)]
    titles = [panel[0] for panel in plot.shown_panels({"a": (train_rows, plain)})]
    assert not {"hellaswag_acc_norm", "lambada_acc", "wikitext_word_ppl"} & set(titles)
    titles = [panel[0] for panel in plot.shown_panels({"a": (train_rows, plain), "b": (train_rows, with_tasks)})]
    assert {"hellaswag_acc_norm", "lambada_acc", "wikitext_word_ppl"} <= set(titles)


def test_the_wilson_interval_stays_inside_0_and_1_at_the_ends():
    """Found in review: at 0 of 21 the lower bound came out -1.4e-17, at 16 of 16 the upper 1 + 2e-16. At k = 0 the
    score interval's lower end is exactly 0 (and at k = n the upper is 1): p = 0 makes center = half."""
    for n in range(1, 400):
        assert gust_eval.wilson_interval(0, n)[0] == 0.0 and gust_eval.wilson_interval(n, n)[1] == 1.0
        low, high = gust_eval.wilson_interval(n // 3, n)
        assert 0.0 <= low <= n // 3 / n <= high <= 1.0
    z = 1.959963984540054  # 1 of 7 against the formula written out here (Wilson 1927, eq. for the score interval)
    p, n = 1 / 7, 7
    expected = [(p + z * z / (2 * n) + sign * z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)
                for sign in (-1, 1)]
    assert gust_eval.wilson_interval(1, 7) == pytest.approx(expected, abs=1e-15)
