"""``hal run``: the tiny model end to end (subprocesses for the JSON contract), option parsing and errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hal.cli import RunError, main, parse_prompt_ids, random_prompts

HAL = [sys.executable, "-m", "hal.cli"]
REQUIRED = (
    "backend",
    "model",
    "dtype",
    "tokens",
    "prompt_lengths",
    "finish_reasons",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "peak_memory_bytes",
)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HAL, "run", *args], capture_output=True, text=True, timeout=300, env=dict(os.environ))


# ---------------------------------------------------------------------------------------------------
# Parsing (no model)
# ---------------------------------------------------------------------------------------------------


def test_parse_prompt_ids_splits_prompts_and_ids() -> None:
    assert parse_prompt_ids("1,2,3;7,8") == [[1, 2, 3], [7, 8]]
    assert parse_prompt_ids(" 4 , 5 ; 6 ") == [[4, 5], [6]]
    assert parse_prompt_ids("9") == [[9]]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("1,,x", r"prompt 0 \('1,,x'\): item 1 is '', not an integer"),
        ("1,2;a", r"prompt 1 \('a'\): item 0 is 'a', not an integer"),
        ("1,2;", "prompt 1 is empty"),
        ("", "prompt 0 is empty"),
        ("1.5", "not an integer"),
        ("1_0", "item 0 is '1_0', not an integer"),  # int() would read 10
        ("+3", "not an integer"),
        ("\u0663", "not an integer"),  # an Arabic-Indic 3
    ],
)
def test_parse_prompt_ids_rejects_malformed_text(text: str, match: str) -> None:
    with pytest.raises(RunError, match=match):
        parse_prompt_ids(text)


def test_negative_ids_parse_and_are_left_to_the_vocabulary_check() -> None:
    assert parse_prompt_ids("-1,2") == [[-1, 2]]


@pytest.mark.parametrize("seed", [str(2**64), str(-(2**63) - 1)])
def test_a_seed_torch_cannot_take_is_refused_before_anything_runs(
    seed: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--seed", seed, "--max-new-tokens", "2", "--backend", "cpu"]) != 0
    out, err = capsys.readouterr()
    assert out == "" and "--seed: seed must lie in [-2**63, 2**64)" in err and "Traceback" not in err


def test_random_prompts_are_seeded_and_of_different_lengths() -> None:
    prompts = random_prompts(4, 1024, seed=0)
    assert [len(p) for p in prompts] == [8, 16, 24, 32]
    assert prompts == random_prompts(4, 1024, seed=0) and prompts != random_prompts(4, 1024, seed=1)
    assert all(0 <= t < 1024 for p in prompts for t in p)


def test_malformed_prompt_ids_exit_1_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--prompt-ids", "1,,x"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "hal run: error: --prompt-ids: prompt 0 ('1,,x'): item 1 is '', not an integer" in err


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--prompt", "hello"], "--prompt: text needs a tokenizer; give --model DIR with a tokenizer.json"),
        (["--prompt-ids", "1,2", "--batch", "3"], "--batch: draws random prompts; it cannot be combined"),
    ],
)
def test_unusable_options_exit_1(args: list[str], match: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", *args]) == 1
    out, err = capsys.readouterr()
    assert out == "" and f"hal run: error: {match}" in err


def test_prompt_needs_a_tokenizer_json_in_the_model_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--model", str(tmp_path), "--prompt", "hello"]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'tokenizer.json'} not found" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dtype", "float64"], "invalid choice: 'float64'"),
        (["--quantize", "int4"], "invalid choice: 'int4'"),
        (["--max-new-tokens", "-1"], "must be >= 0"),
        (["--batch", "0"], "must be >= 1"),
        (["--prompt-ids", "1", "--prompt", "a"], "not allowed with argument"),
    ],
)
def test_argparse_rejects_bad_values(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", *args])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# The tiny model end to end
# ---------------------------------------------------------------------------------------------------


def test_run_json_prints_one_document_with_tokens_and_rates() -> None:
    proc = run("--json", "--max-new-tokens", "4", "--batch", "2")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)  # stdout holds the JSON document and nothing else
    assert set(REQUIRED) <= set(data)
    assert data["backend"] == "cpu" and data["model"] == "tiny (random weights)" and data["dtype"] == "float32"
    assert len(data["tokens"]) == 2 and all(len(t) == 4 for t in data["tokens"])
    assert all(0 <= t < 1024 for seq in data["tokens"] for t in seq)
    assert data["prompt_lengths"][0] != data["prompt_lengths"][1]
    assert data["finish_reasons"] == ["length", "length"]  # the tiny config has no EOS
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_memory_bytes"):
        assert isinstance(data[key], (int, float)) and math.isfinite(data[key]) and data[key] > 0, key
    assert "prefill" in proc.stderr  # progress goes to stderr


def test_run_human_output_shows_ids_and_the_rates_line() -> None:
    proc = run("--prompt-ids", "1,2,3;7,8", "--max-new-tokens", "3", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "backend: cpu" in proc.stdout and "model: tiny (random weights)" in proc.stdout
    assert "sequence 0: prompt 3 tokens → 3 new (length)" in proc.stdout
    assert "sequence 1: prompt 2 tokens → 3 new (length)" in proc.stdout
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("prefill: ") and " tok/s · decode: " in last and "peak memory" in last and "MiB" in last
    assert proc.stderr == ""


def test_prompt_ids_give_one_sequence_each(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--json", "-q", "--prompt-ids", "1,2,3;7,8", "--max-new-tokens", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["prompts"] == [[1, 2, 3], [7, 8]] and data["prompt_lengths"] == [3, 2]
    assert len(data["tokens"]) == 2 and all(len(t) == 2 for t in data["tokens"])


def test_seeded_sampling_repeats(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["run", "--json", "-q", "--batch", "2", "--max-new-tokens", "3", "--temperature", "1", "--top-p", "0.9"]
    outputs = []
    for seed in ("5", "5", "6"):
        assert main([*args, "--seed", seed]) == 0
        outputs.append(json.loads(capsys.readouterr().out)["tokens"])
    assert outputs[0] == outputs[1] != outputs[2]


def test_prompt_ids_outside_the_vocabulary_exit_1_without_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--prompt-ids", "1,2;5,1024", "--max-new-tokens", "2", "-q"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "hal run: error: --prompt-ids: prompt 1: token ids must lie in [0, 1024) (the vocabulary), got 1024" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--top-p", "0"], "--top-p: top_p must lie in (0, 1]"),
        (["--temperature", "-1"], "--temperature: temperature must be finite and >= 0"),
        (["--temperature", "nan"], "--temperature: temperature must be finite and >= 0"),
    ],
)
def test_bad_sampling_values_exit_1_naming_the_flag(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--max-new-tokens", "1", "-q", *flags]) == 1
    assert capsys.readouterr().err.startswith(f"hal run: error: {message}")


def test_a_closed_stdout_is_no_traceback() -> None:
    # `hal run --json | head -c 1`: the reader has gone when the output is written (its end of the pipe
    # is closed before the run starts, so every write fails with EPIPE).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout block-buffered, as usual
    proc = subprocess.Popen(
        [*HAL, "run", "--json", "-q", "--max-new-tokens", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 1
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_quantize_fp8_runs_the_tiny_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--json", "-q", "--quantize", "fp8", "--batch", "1", "--max-new-tokens", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["quantize"] == "fp8" and len(data["tokens"][0]) == 2


# ---------------------------------------------------------------------------------------------------
# --model DIR --prompt TEXT (a model directory written here, a word-level tokenizer.json)
# ---------------------------------------------------------------------------------------------------

WORDS = ["[UNK]", "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "hello", "world"]


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safetensors.torch import save_file
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from hal.model import ModelConfig, random_state_dict

    root = tmp_path_factory.mktemp("text-model")
    raw = {
        "model_type": "deepseek_v3",
        "vocab_size": 32,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "q_lora_rank": None,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 16,
        "v_head_dim": 16,
        "max_position_embeddings": 128,
        "eos_token_id": None,
    }
    (root / "config.json").write_text(json.dumps(raw))
    save_file(random_state_dict(ModelConfig.from_dict(raw), seed=3), str(root / "model.safetensors"))
    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(root / "tokenizer.json"))
    return root


def test_prompt_text_is_tokenized_and_the_output_decoded(
    text_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["run", "--model", str(text_model_dir), "--prompt", "the cat sat", "--prompt", "hello", "-q"]
    assert main([*args, "--json", "--max-new-tokens", "3"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == str(text_model_dir)
    assert data["prompts"] == [[1, 2, 3], [10]] and data["prompt_texts"] == ["the cat sat", "hello"]
    assert len(data["texts"]) == 2 and all(isinstance(t, str) for t in data["texts"])
    assert main([*args, "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "prompt: 'the cat sat'" in out and "text:" in out


def test_a_prompt_that_encodes_to_nothing_is_an_error(text_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--model", str(text_model_dir), "--prompt", "   ", "-q"]) == 1
    assert "--prompt: prompt 0 ('   ') encodes to no tokens" in capsys.readouterr().err


def test_the_loaders_log_lines_reach_stderr(text_model_dir: Path, tmp_path: Path) -> None:
    """What the loader logs (here: a multi-token-prediction layer skipped) is shown unless -q."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    model = Path(shutil.copytree(text_model_dir, tmp_path / "model"))
    tensors = load_file(str(model / "model.safetensors"))
    tensors["model.layers.2.eh_proj.weight"] = torch.zeros(64, 128)
    save_file(tensors, str(model / "model.safetensors"))
    proc = run("--model", str(model), "--prompt-ids", "1,2", "--max-new-tokens", "1")
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 tensors of 1 multi-token-prediction layer(s) (model.layers.2)" in proc.stderr
    quiet = run("--model", str(model), "--prompt-ids", "1,2", "--max-new-tokens", "1", "-q")
    assert quiet.returncode == 0 and "multi-token-prediction" not in quiet.stderr


def test_a_tokenizer_that_cannot_encode_is_an_error(
    text_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tokenizers import Tokenizer

    def broken(self: object, text: str) -> object:
        raise Exception("unknown token in the model")  # what tokenizers raises: a plain Exception

    monkeypatch.setattr(Tokenizer, "encode", broken)
    assert main(["run", "--model", str(text_model_dir), "--prompt", "the cat", "-q"]) == 1
    captured = capsys.readouterr()
    assert "tokenizer.json cannot encode the prompt: unknown token in the model" in captured.err
    assert captured.out == ""


def test_prompts_are_checked_before_the_weights_are_read(text_model_dir: Path, tmp_path: Path) -> None:
    # Only config.json and tokenizer.json: a prompt the model cannot take is refused without reading a
    # weight (the load would fail on the missing safetensors). Ids from the tokenizer are named as its.
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(text_model_dir / name, bare / name)
    ids = run("--model", str(bare), "--prompt-ids", "1,2,40", "--max-new-tokens", "1")
    assert ids.returncode != 0 and ids.stdout == ""
    assert "--prompt-ids: prompt 0: token ids must lie in [0, 32) (the vocabulary), got 40 at position 2" in ids.stderr
    long = run("--model", str(bare), "--prompt-ids", ",".join(["1"] * 100), "--max-new-tokens", "40")
    assert "--prompt-ids: prompt 0 has 100 tokens; with max_new_tokens=40" in long.stderr
    drawn = run("--model", str(bare), "--batch", "2", "--max-new-tokens", "120")
    drawn_prompts = "2 random prompt(s) of 8-32 tokens (no --prompt-ids or --prompt)"
    assert f"error: {drawn_prompts}: prompt 1 has 32 tokens" in drawn.stderr
    # A tokenizer whose ids run past the model's vocabulary (here: one word moved to id 50).
    data = json.loads((bare / "tokenizer.json").read_text())
    data["model"]["vocab"]["world"] = 50
    (bare / "tokenizer.json").write_text(json.dumps(data))
    text = run("--model", str(bare), "--prompt", "hello world", "--max-new-tokens", "1")
    assert text.returncode != 0 and "safetensors" not in text.stderr
    assert f"--prompt (ids from {bare / 'tokenizer.json'}): prompt 0: token ids must lie in [0, 32)" in text.stderr
