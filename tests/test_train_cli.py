"""`s2ft train` end to end on a tiny LLaMA saved to disk: every method writes its result and
lowers the validation loss; YAML configs round-trip; bad input fails cleanly without writing a
run; a SIGKILLed run resumes to the same result; 2-process torchrun and accelerate launches
without --device train as one DDP job (equal to one process on the combined batch), and a launch
whose ranks would not synchronise is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers as T
import yaml
from conftest import free_port, tiny_llama_for, word_tokenizer
from safetensors.torch import load_file

from s2ft.cli import main
from s2ft.data import build_dataset, builtin_dataset
from s2ft.train import TrainArgs, resolve_args


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny LLaMA + word-level tokenizer (with a chat template) on disk, and 40 records."""
    root = tmp_path_factory.mktemp("train")
    records = builtin_dataset("arc_easy")[0][:40]
    tok = word_tokenizer(records)
    model = tiny_llama_for(tok)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"root": root, "model": str(root / "model"), "data": str(data), "records": records}


def _train(setup, out, *extra):
    argv = ["train", "--model", setup["model"], "--data", setup["data"], "--output-dir", str(out)]
    argv += ["--val-split", "8", "--logging-steps", "2", "--save-steps", "5", "--device", "cpu", *extra]
    return main(argv)


METHOD_FLAGS = {
    "s2ft": ["--ffn-ratio", "0.25", "--attn-ratio", "0.5", "--learning-rate", "2e-2"],
    "lora": ["--lora-rank", "4", "--learning-rate", "2e-2"],
    "dora": ["--lora-rank", "4", "--learning-rate", "2e-2"],
    "full": ["--learning-rate", "5e-3"],
}


@pytest.mark.parametrize("method", list(METHOD_FLAGS))
def test_each_method_trains_and_writes_its_result(setup, tmp_path, method):
    out = tmp_path / method
    assert _train(setup, out, "--method", method, "--max-steps", "10", *METHOD_FLAGS[method]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 10
    assert summary["val_loss_after"] < summary["val_loss_before"] - 0.02, summary
    for name in ("train_config.yaml", "metrics.jsonl", "loss.png"):
        assert (out / name).is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6, 8, 10]
    final_evals = [r["eval_loss"] for r in rows if "eval_loss" in r and r["step"] == 10]
    assert final_evals == [summary["val_loss_after"]]  # the last-step evaluation is reused, not run again

    base = T.AutoModelForCausalLM.from_pretrained(setup["model"])
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ref = base(ids).logits
    if method == "s2ft":
        from s2ft import S2FTModel

        assert {p.name for p in (out / "adapter").iterdir()} == {"s2ft_adapter.safetensors", "s2ft_config.json"}
        tuned = S2FTModel.from_pretrained(base, out / "adapter")
    elif method in ("lora", "dora"):
        from peft import PeftModel

        assert json.loads((out / "adapter" / "adapter_config.json").read_text())["use_dora"] == (method == "dora")
        tuned = PeftModel.from_pretrained(base, out / "adapter")
    else:
        tuned = T.AutoModelForCausalLM.from_pretrained(out / "model")
        assert (out / "model" / "tokenizer.json").is_file()
    with torch.no_grad():
        assert not torch.allclose(tuned(ids).logits, ref, atol=1e-4)


def test_match_params_both_ways(setup, tmp_path):
    assert _train(setup, tmp_path / "s", "--max-steps", "1", "--match-params", "--lora-rank", "4") == 0
    s = json.loads((tmp_path / "s" / "summary.json").read_text())
    # rank 4 on q (32->32), k and v (32->16: 2 KV heads x 8), up (32->48), down (48->32), 2 layers
    assert s["matched"]["lora_parameters"] == 4 * 2 * ((32 + 32) + 2 * (32 + 16) + 2 * (32 + 48))
    per_channel = 3 * 32  # a row of up and gate, a column of down
    assert abs(s["trainable_parameters"] - s["matched"]["lora_parameters"]) <= 2 * per_channel
    assert _train(setup, tmp_path / "l", "--method", "lora", "--max-steps", "1", "--match-params") == 0
    lo = json.loads((tmp_path / "l" / "summary.json").read_text())
    assert lo["lora_rank"] == lo["matched"]["lora_rank"] >= 1


def test_chat_template_labels_only_assistant_turns(setup):
    tok = T.AutoTokenizer.from_pretrained(setup["model"])
    rec = {
        "messages": [
            {"role": "user", "content": "Which is the correct answer"},
            {"role": "assistant", "content": "answer1"},
            {"role": "user", "content": "the correct answer"},
            {"role": "assistant", "content": "answer2 answer3"},
        ]
    }
    (row,), stats = build_dataset([rec], tok, 512, template="auto")
    learned = tok.decode([t for t in row["labels"] if t != -100])
    assert learned.split() == ["answer1", "<eos>", "answer2", "answer3", "<eos>"]
    assert stats == {"records": 1, "kept": 1, "truncated": 0, "skipped": 0}
    # an Alpaca record through the chat template: user = instruction, assistant = output
    (row,), _ = build_dataset(setup["records"][:1], tok, 512, template="chat")
    assert tok.decode([t for t in row["labels"] if t != -100]).split()[-2:] == [setup["records"][0]["answer"], "<eos>"]


def test_long_samples_are_counted_truncated_or_skipped(setup):
    tok = T.AutoTokenizer.from_pretrained(setup["model"])
    recs = setup["records"][:10]
    lengths = [len(r["input_ids"]) for r in build_dataset(recs, tok, 10_000)[0]]
    limit = sorted(lengths)[5]
    n_long = sum(n > limit for n in lengths)
    rows, stats = build_dataset(recs, tok, limit, long_samples="truncate")
    assert stats["truncated"] == n_long and len(rows) == 10 and max(len(r["input_ids"]) for r in rows) == limit
    assert all(r["labels"][-1] == tok.eos_token_id for r in rows)  # the response survives truncation
    rows, stats = build_dataset(recs, tok, limit, long_samples="skip")
    assert stats["skipped"] == n_long and len(rows) == 10 - n_long


def test_yaml_config_round_trip_and_precedence(setup, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": setup["model"],
                "data": setup["data"],
                "max-steps": 2,
                "learning_rate": 1e-3,
                "ffn_modules": ["up", "down"],
            }
        )
    )
    out = tmp_path / "out"
    assert main(["train", "--config", str(cfg), "--output-dir", str(out), "--learning-rate", "3e-3"]) == 0
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert saved["learning_rate"] == 3e-3 and saved["max_steps"] == 2 and saved["ffn_modules"] == "up,down"
    again = resolve_args({"config": str(out / "train_config.yaml")})
    assert again == TrainArgs(**saved)
    assert json.loads((out / "adapter" / "s2ft_config.json").read_text())["config"]["ffn_modules"] == ["up", "down"]


def _fails(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    return err


def test_bad_input_fails_clearly_and_writes_nothing(setup, tmp_path, capsys):
    base = ["train", "--model", setup["model"], "--max-steps", "1"]
    good = json.dumps(setup["records"][0])
    cases = {
        "malformed.jsonl": (good + "\n{not json\n", ["malformed.jsonl:2", "malformed JSON"]),
        "missing.jsonl": (good + "\n" + json.dumps({"instruction": "x"}) + "\n", ["missing.jsonl:2", "'output'"]),
        "empty.jsonl": ("\n\n", ["empty.jsonl", "no records"]),
        "array.json": (json.dumps([setup["records"][0], {"output": "y"}]), ["array.json: record 1", "'instruction'"]),
        "chat.jsonl": (json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n", ["no 'assistant' turn"]),
        "bad.csv": ("instruction,output\na,b,c\n", ["bad.csv:2", "more values"]),
        "data.txt": ("hello", ["unsupported file type"]),
    }
    for name, (text, needles) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        out = tmp_path / f"out-{name}"
        _fails(capsys, [*base, "--data", str(path), "--output-dir", str(out)], *needles)
        assert not out.exists()
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(json.dumps({"instruction": "caf\u00e9", "output": "x"}, ensure_ascii=False).encode("latin-1"))
    _fails(capsys, [*base, "--data", str(latin), "--output-dir", str(tmp_path / "o1")], "latin1.jsonl", "not UTF-8")
    _fails(
        capsys, [*base, "--data", str(tmp_path / "nope.jsonl"), "--output-dir", str(tmp_path / "o2")], "no such file"
    )
    _fails(
        capsys, [*base, "--data", setup["data"], "--output-dir", str(tmp_path / "o3"), "--method", "qlora"], "--method"
    )
    _fails(
        capsys,
        [*base, "--data", setup["data"], "--output-dir", str(tmp_path / "o4"), "--batch-size", "0"],
        "--batch-size",
    )
    _fails(
        capsys,
        [*base, "--data", setup["data"], "--output-dir", str(tmp_path / "o5"), "--ffn-ratio", "1.5"],
        "ffn_ratio",
    )
    _fails(
        capsys,
        [
            *base,
            "--data",
            setup["data"],
            "--output-dir",
            str(tmp_path / "o6"),
            "--max-length",
            "3",
            "--long-samples",
            "skip",
        ],
        "no usable samples",
    )
    _fails(capsys, [*base, "--output-dir", str(tmp_path / "o7")], "--data: required")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("max_steps: 2\nlearning_rat: 1e-3\n")
    _fails(capsys, ["train", "--config", str(bad_yaml)], "bad.yaml", "learning_rat")
    bad_yaml.write_text("max_steps: [2\n")
    _fails(capsys, ["train", "--config", str(bad_yaml)], "bad.yaml:2", "malformed YAML")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 8))


def test_existing_run_is_refused_unless_overwrite(setup, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # an unrelated file is not a run
    assert _train(setup, out, "--max-steps", "1") == 0
    before = (out / "adapter" / "s2ft_adapter.safetensors").read_bytes()
    _fails(
        capsys,
        ["train", "--model", setup["model"], "--data", setup["data"], "--output-dir", str(out), "--max-steps", "1"],
        "already holds a run",
        "--overwrite",
    )
    assert (out / "adapter" / "s2ft_adapter.safetensors").read_bytes() == before
    assert _train(setup, out, "--max-steps", "2", "--overwrite") == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert (out / "notes.txt").read_text() == "mine"


def test_only_rank0_judges_the_output_dir(tmp_path):
    """Under torchrun rank 0 writes train_config.yaml early; a slower rank checking afterwards
    must not take it for an old run (this raced in a CI run of the torchrun test)."""
    from s2ft.train import prepare_output_dir

    out = tmp_path / "run"
    out.mkdir()
    (out / "train_config.yaml").write_text("max_steps: 4\n")
    args = TrainArgs(data="x.jsonl", output_dir=str(out))
    with pytest.raises(ValueError, match="already holds a run"):
        prepare_output_dir(args, rank0=True)
    assert prepare_output_dir(args, rank0=False) is None
    ckpt = out / "checkpoints" / "checkpoint-3"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    resume = TrainArgs(data="x.jsonl", output_dir=str(out), resume=True)
    assert prepare_output_dir(resume, rank0=True) == prepare_output_dir(resume, rank0=False) == str(ckpt)


def _cli(*argv):
    return [sys.executable, "-m", "s2ft.cli", *argv]


def test_sigkill_then_resume_matches_an_uninterrupted_run(setup, tmp_path):
    common = ["train", "--model", setup["model"], "--data", setup["data"], "--device", "cpu", "--max-steps", "40"]
    common += ["--save-steps", "5", "--logging-steps", "1", "--ffn-ratio", "0.25", "--learning-rate", "1e-2"]
    ref = tmp_path / "ref"
    subprocess.run(_cli(*common, "--output-dir", str(ref)), check=True, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli(*common, "--output-dir", str(out)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 600  # generous: a starved CPU must not fail the test
    while not (out / "checkpoints" / "checkpoint-10" / "adapter").is_dir():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "adapter").exists()
    done = subprocess.run(_cli("train", "--output-dir", str(out), "--resume"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["resumed_from"].split("-")[-1] in {str(s) for s in range(10, 40, 5)}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 41))  # each step logged once, none lost
    a = load_file(ref / "adapter" / "s2ft_adapter.safetensors")
    b = load_file(out / "adapter" / "s2ft_adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_torchrun_two_processes(setup, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(free_port()), "-m", "s2ft.cli", "train", "--model", setup["model"]]
    cmd += ["--data", setup["data"], "--output-dir", str(out), "--max-steps", "4", "--device", "cpu"]
    cmd += ["--ffn-ratio", "0.25", "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4 and summary["ranks_identical"] is True
    assert (out / "adapter" / "s2ft_adapter.safetensors").is_file()
    assert done.stdout.count("[s2ft train] done") == 1  # rank 0 reports, rank 1 stays quiet


def test_demo_runs_the_train_pipeline_and_reports(setup, tmp_path):
    from s2ft.demo import run_demo

    out = tmp_path / "demo"
    for _ in range(2):  # the demo can be rerun into the same directory
        report = run_demo(model_spec=setup["model"], output_dir=out, steps=2, batch_size=2, eval_limit=8)
    assert json.loads((out / "report.json").read_text())["after"] == report["after"]
    assert report["before"]["n"] == report["after"]["n"] == 8
    assert report["after"]["loss"] < report["before"]["loss"]
    assert (out / "adapter" / "s2ft_adapter.safetensors").is_file() and (out / "loss.png").is_file()


CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_configs_are_valid(path):
    args = resolve_args({"config": str(path), "output_dir": "unused"})
    assert args.data and args.model
    assert path.name != "demo.yaml" or args.data == "builtin:arc_easy_text"


# ---------------------------------------------------------------------------------------------
# Several processes without --device: the launch must find out by itself that there is no GPU.
# CUDA is hidden from the launched processes, so these tests see a CPU-only machine everywhere.

DDP_FLAGS = ["--max-steps", "3", "--ffn-ratio", "0.25", "--attn-ratio", "0.5", "--learning-rate", "5e-2"]
DDP_FLAGS += ["--logging-steps", "1"]
NO_GPU = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def _run(cmd, env=None, ok=True):
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **NO_GPU, **(env or {})})
    if ok:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


# The launch commands docs/TRAINING.md and docs/INTEGRATIONS.md show (tests/test_integrations_docs.py
# checks they are there); the tests below run exactly these, with a port and the run's options added.
TORCHRUN_DOC = "torchrun --nproc_per_node 2 -m s2ft.cli train"
ACCELERATE_DOC = (
    "accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no "
    "-m s2ft.cli train"
)
_PROGRAMS = {"torchrun": "torch.distributed.run", "accelerate": "accelerate.commands.launch"}


def _documented(command, port_args, setup, out):
    """`command` as a subprocess argv: the launcher through this Python, `port_args` before `-m`."""
    prog, *words = command.split()
    if prog == "accelerate":
        words = words[1:]  # "launch" is the module's job
    at = words.index("-m")
    return [
        sys.executable,
        "-m",
        _PROGRAMS[prog],
        *words[:at],
        *port_args,
        *words[at:],
        *_train_argv(setup, out, 2)[1:],
    ]


def _train_argv(setup, out, batch_size):
    return ["train", "--model", setup["model"], "--data", setup["data"], "--output-dir", str(out)] + [
        "--batch-size",
        str(batch_size),
        *DDP_FLAGS,
    ]


@pytest.fixture(scope="module")
def one_process(setup, tmp_path_factory):
    """The reference for the 2-process runs below: one process on their combined batch (2 x 2
    sequences), same seed and data. Trainer's data order is the same: both draw one seeded
    permutation, and under DDP rank r takes micro-batch 2k+r of it, so step k sees the same 4 rows."""
    out = tmp_path_factory.mktemp("one") / "run"
    _run(_cli(*_train_argv(setup, out, 4)))
    return out


def _losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _assert_two_ranks_match_one_process(out, ref):
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3, summary
    a = load_file(out / "adapter" / "s2ft_adapter.safetensors")
    b = load_file(ref / "adapter" / "s2ft_adapter.safetensors")
    assert a.keys() == b.keys()
    deltas = [k for k in a if a[k].is_floating_point()]
    assert deltas and max(float(b[k].abs().max()) for k in deltas) > 1e-2  # training moved the deltas
    for k in a:  # the indices exactly, the deltas up to float32 summation order
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    assert _losses(out) == pytest.approx(_losses(ref), rel=1e-4)  # the logged loss is the global one
    assert summary["ranks_identical"] is True


def test_torchrun_without_device_is_one_ddp_job(setup, tmp_path, one_process):
    """On a CPU-only machine `--device auto` must give DDP over gloo, not two unsynchronised copies
    (Trainer only logged `parallel_mode != ParallelMode.DISTRIBUTED` while each rank trained alone)."""
    out = tmp_path / "ddp"
    _run(_documented(TORCHRUN_DOC, ["--master_addr", "127.0.0.1", "--master_port", str(free_port())], setup, out))
    _assert_two_ranks_match_one_process(out, one_process)


def test_accelerate_launch_two_cpu_processes(setup, tmp_path, one_process):
    """The documented accelerate command for N CPU processes: --multi_gpu (accelerate's torchrun-based
    launcher; `--cpu` would start a single process). HF_HOME hides any local accelerate config."""
    out = tmp_path / "acc"
    _run(
        _documented(ACCELERATE_DOC, ["--main_process_port", str(free_port())], setup, out),
        env={"HF_HOME": str(tmp_path / "hf")},
    )
    _assert_two_ranks_match_one_process(out, one_process)


UNSYNCED = """import sys
import s2ft.train as t
t.use_cpu = lambda device: False  # the old bug: Trainer not told to use the CPU, so no DDP on CPU
{bypass}
from s2ft.cli import main
sys.exit(main())
"""


def test_unsynchronised_processes_are_refused(setup, tmp_path):
    """Reintroduce the old bug in a 2-process launch: `require_ddp` refuses it before the run
    directory is written; past that guard, the ranks' parameters differ after training, so the
    run fails, writes no adapter and says so in summary.json."""
    for bypass in ("", "t.require_ddp = lambda targs: None"):
        script = tmp_path / "unsynced.py"
        script.write_text(UNSYNCED.format(bypass=bypass))
        out = tmp_path / f"out{len(bypass)}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
        cmd += ["--master_port", str(free_port()), str(script), *_train_argv(setup, out, 2)]
        done = _run(cmd, ok=False)
        assert done.returncode != 0
        if not bypass:
            assert "would train its own copy" in done.stderr and "--multi_gpu" in done.stderr, done.stderr[-3000:]
            assert not out.exists()
        else:
            assert "ended training with different parameters" in done.stderr, done.stderr[-3000:]
            summary = json.loads((out / "summary.json").read_text())
            assert summary["ranks_identical"] is False and summary["output"] is None and "error" in summary
            assert not (out / "adapter").exists()


def test_require_ddp_and_the_accelerate_cpu_warning(monkeypatch):
    from types import SimpleNamespace

    from transformers.training_args import ParallelMode

    from s2ft.train import accelerate_cpu_warning, require_ddp

    alone = SimpleNamespace(parallel_mode=ParallelMode.NOT_PARALLEL, device=torch.device("cpu"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    require_ddp(alone)  # one process: nothing to synchronise
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2.*own copy"):
        require_ddp(alone)
    require_ddp(SimpleNamespace(parallel_mode=ParallelMode.DISTRIBUTED, device=torch.device("cpu")))

    simple = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert "--multi_gpu" in accelerate_cpu_warning(simple)  # accelerate launch --cpu --num_processes 2
    assert accelerate_cpu_warning({**simple, "WORLD_SIZE": "2"}) is None  # torchrun-started
    assert accelerate_cpu_warning({**simple, "PMI_SIZE": "2"}) is None  # mpirun-started
    assert accelerate_cpu_warning({"ACCELERATE_USE_CPU": "True"}) is None  # --cpu, one process asked for
    assert accelerate_cpu_warning({"MASTER_ADDR": "127.0.0.1"}) is None


def test_max_grad_norm_zero_disables_clipping(setup, tmp_path):
    """`--max-grad-norm 0` is documented as "0 disables"; it used to reach Trainer as None and crash."""
    out = tmp_path / "noclip"
    assert _train(setup, out, "--max-steps", "2", "--max-grad-norm", "0", "--logging-steps", "1") == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
