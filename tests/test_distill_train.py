"""The loop on a tiny random Llama teacher and its converted hybrid: kill -9 then resume repeats the
uninterrupted run's losses exactly; a non-finite loss stops without touching the last good checkpoint;
LOO equals removing the layer by hand; MMR and staged conversion produce consistent rankings/layouts."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from distill_tiny import write_fixture

from distill.config import load_config

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("apriel_model.convert")


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_fixture(root)
    return root


def _args(root: Path, out: Path, steps: int) -> list[str]:
    return [f"model.teacher={root / 'teacher'}", f"data.train_path={root / 'traces.jsonl'}", "model.num_mixers=2",
            "data.seq_len=96", "data.batch_size=2", f"train.steps={steps}", "train.save_every=4", "train.eval_every=0",
            "train.threads=1", "train.progress=false", "train.tensorboard=false", "optim.grad_accum=2",
            f"train.out_dir={out}"]


def _losses(out: Path) -> dict[int, float]:
    losses = {}
    for line in (out / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            losses[rec["step"]] = rec["loss"]  # a re-run step overwrites the killed run's record
    return losses


def _run(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "distill", "train", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_kill9_then_resume_repeats_the_uninterrupted_run(fixture_dir, tmp_path):
    steps = 14
    ref = _run(_args(fixture_dir, tmp_path / "ref", steps))
    victim = _run(_args(fixture_dir, tmp_path / "victim", steps))
    latest = tmp_path / "victim" / "checkpoints" / "LATEST"
    deadline = time.time() + 100
    while not latest.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert victim.poll() is None, "the run ended before its first checkpoint: make it longer"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = max(_losses(tmp_path / "victim"))
    ckpt_step = int(latest.read_text().strip().split("_")[1])
    assert ckpt_step < steps and killed_at < steps
    resumed = _run(_args(fixture_dir, tmp_path / "victim", steps))
    out, err = resumed.communicate(timeout=150)
    assert resumed.returncode == 0, err[-3000:]
    assert "resumed train from" in err and f"at step {ckpt_step}" in err
    out_ref, err_ref = ref.communicate(timeout=150)
    assert ref.returncode == 0, err_ref[-3000:]
    a, b = _losses(tmp_path / "ref"), _losses(tmp_path / "victim")
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for step in a:  # CPU fp32, same threads: bit-identical, far below bf16 noise
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step
    assert killed_at - ckpt_step <= 4  # nothing lost beyond the checkpoint interval
    final_a, final_b = json.loads(out_ref.strip().splitlines()[-1]), json.loads(out.strip().splitlines()[-1])
    assert final_b["step"] == steps and final_b["eval"]["rev_kl"] == pytest.approx(final_a["eval"]["rev_kl"], rel=1e-6)


def _setup(root, out, steps=2, extra=()):
    from distill.pipeline import prepare

    cfg = load_config(overrides=_args(root, out, steps)[:-1] + [f"train.out_dir={out}", *extra])
    return cfg, prepare(cfg)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(fixture_dir, tmp_path):
    from distill.pipeline import build_student, ranking_order
    from distill.trainer import NonFiniteLossError, Trainer, latest_checkpoint

    out = tmp_path / "nan"
    cfg, setup = _setup(fixture_dir, out, steps=4)
    order, _ = ranking_order(cfg, setup, out)
    student = build_student(cfg, setup, order)
    cfg.train.steps = 4
    Trainer(cfg, student, setup.teacher, setup.stream, setup.eval_batches, out, setup.info).run()
    good = latest_checkpoint(out)
    before = (good / "state.pt").read_bytes()
    cfg.train.steps = 8
    student2 = build_student(cfg, setup, order)
    trainer = Trainer(cfg, student2, setup.teacher, setup.stream, setup.eval_batches, out, setup.info)
    with torch.no_grad():
        next(p for n, p in student2.named_parameters() if "mixer.out_proj" in n).fill_(float("nan"))
    trainer.load_checkpoint(good)
    with torch.no_grad():  # poison after loading: the step after the checkpoint must blow up
        next(p for n, p in student2.named_parameters() if "mixer.out_proj" in n).fill_(float("nan"))
    cfg.train.resume = False
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 5 .*Last good checkpoint: .*step_0000004"):
        trainer.run()
    assert latest_checkpoint(out) == good and (good / "state.pt").read_bytes() == before


def test_loo_equals_removing_the_layer_by_hand(fixture_dir, tmp_path):
    import copy

    from distill.ranking import loo_scores
    from distill.trainer import evaluate

    _, setup = _setup(fixture_dir, tmp_path / "loo")
    teacher = setup.teacher
    scores = loo_scores(teacher, setup.eval_batches, "cpu", score="kl")
    assert sorted(scores) == list(range(4)) and all(v > 1e-4 for v in scores.values())
    for layer in (0, 2):
        cut = copy.deepcopy(teacher)
        del cut.model.layers[layer]
        kl = evaluate(cut, teacher, setup.eval_batches, "cpu")["rev_kl"]
        assert scores[layer] == pytest.approx(kl, rel=1e-5)
    nll = loo_scores(teacher, setup.eval_batches, "cpu", score="nll", candidates=[1])
    assert list(nll) == [1] and nll[1] != scores[1]
    with pytest.raises(ValueError, match="candidates"):
        loo_scores(teacher, setup.eval_batches, "cpu", candidates=[9])


def test_mmr_ranking_json_roundtrip(fixture_dir, tmp_path):
    from distill.ranking import load_ranking, make_ranking, mmr_scores, save_ranking

    cfg, setup = _setup(fixture_dir, tmp_path / "mmr")
    scores = mmr_scores(setup.teacher, setup.teacher, [0, 3], setup.stream, steps=3, lr=1e-3, last=2,
                        loss_cfg=cfg.loss, device="cpu")
    assert sorted(scores) == [0, 3] and all(v > 0 and math.isfinite(v) for v in scores.values())
    assert setup.stream.state_dict() == {"epoch": 0, "index": 0}
    ranking = make_ranking("mmr", "distill_loss", scores, 4, "tiny")
    assert ranking["order"] == sorted(scores, key=scores.get)
    path = save_ranking(tmp_path / "r.json", ranking)
    assert load_ranking(path, 4)["order"] == ranking["order"]
    path.write_text(json.dumps({**ranking, "order": [0, 0]}))
    with pytest.raises(ValueError, match="distinct"):
        load_ranking(path)


def test_stages_carry_trained_mixers_forward(fixture_dir, tmp_path):
    from distill.modeling import convert, layout_of, transfer_matching
    from distill.stages import next_layout, run_stages

    assert next_layout(["m2", "t", "t", "t"], [0, 3, 1], 3) == ["m2", "m2", "t", "m2"]
    with pytest.raises(ValueError, match="fewer"):
        next_layout(["m2", "m2", "t"], [2], 1)
    out = tmp_path / "stages"
    cfg, setup = _setup(fixture_dir, out, steps=2, extra=["stages.schedule=1,2", "train.save_every=0"])
    student, summaries = run_stages(cfg, setup, [2, 0, 1, 3], out)
    assert [s["mixers"] for s in summaries] == [1, 2] and layout_of(student) == ["m2", "t", "m2", "t"]
    assert all(s["step"] == 2 and s["eval"]["rev_kl"] > 0 for s in summaries)
    # the transfer keeps a trained mixer and MIL-initialises only the new one
    prev = convert(setup.teacher, ["t", "t", "m2", "t"], seed=1)
    with torch.no_grad():
        prev.model.layers[2].mixer.dt_proj.bias.add_(0.5)
    nxt = convert(setup.teacher, ["m2", "t", "m2", "t"], seed=1)
    fresh = nxt.model.layers[0].mixer.in_proj.weight.clone()
    left = transfer_matching(prev, nxt)
    assert torch.equal(nxt.model.layers[2].mixer.dt_proj.bias, prev.model.layers[2].mixer.dt_proj.bias)
    assert torch.equal(nxt.model.layers[0].mixer.in_proj.weight, fresh)
    assert left and all(name.startswith("model.layers.0.mixer.") for name in left)


@pytest.mark.slow
def test_torchrun_two_cpu_processes_fsdp2(fixture_dir, tmp_path):
    """The same train command under torchrun: 2 gloo processes, FSDP2-sharded student and teacher,
    data-parallel batches; checkpoints are written and a second launch resumes from them."""
    out = tmp_path / "dist"
    # --standalone: torchrun picks a free port (a fixed one fails when something else holds it)
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "distill", "train", *_args(fixture_dir, out, 4)[:-1], f"train.out_dir={out}", "train.device=cpu",
            "train.trainable=all", "train.save_every=2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    first = subprocess.run(base, check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["step"] == 4 and summary["eval"]["rev_kl"] > 0 and summary["eval"]["tokens"] > 0
    again = subprocess.run([*base, "train.steps=6"], check=False, env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "at step 4" in again.stderr and json.loads(again.stdout.strip().splitlines()[-1])["step"] == 6


def test_main_tears_down_the_process_group_after_a_clean_run(tmp_path):
    """A finished command destroys the process group (a live gloo group at interpreter exit aborts now and then:
    the CI's SIGABRT after "train finished"); the first process group of this test process, one rank."""
    import torch.distributed as dist

    from distill.__main__ import main

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert main(["config"]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("world", ["1", "2"])
def test_cli_ends_a_clean_multiprocess_run_without_interpreter_finalisation(world):
    """cli() (`python -m distill`, `apriel-distill`): after a clean run under torchrun (WORLD_SIZE > 1) the process
    ends by os._exit with its output flushed - interpreter finalisation of torch.distributed's leftovers aborts now
    and then (the CI's SIGABRT after "train finished", session 29) - and returns normally in a single process."""
    code = ("import sys; from distill.__main__ import cli; rc = cli(['config']); "
            "print('RETURNED', rc); sys.stdout.flush()")
    env = dict(os.environ, PYTHONPATH=str(ROOT), WORLD_SIZE=world)
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"num_mixers"' in done.stdout, done.stdout[:500]  # config's output came out before the exit
    assert ("RETURNED 0" in done.stdout) == (world == "1"), done.stdout[-500:]


def test_config_command_does_not_import_torch():
    """`python -m distill config` reads and prints the configuration without importing torch (the teardown after a
    command touches torch.distributed only when the command imported it)."""
    code = ("import sys; from distill.__main__ import main; rc = main(['config']); "
            "assert rc == 0 and 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))")
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_activation_checkpointing_gives_the_same_gradients(fixture_dir, tmp_path):
    from distill.config import LossConfig
    from distill.pipeline import build_student
    from distill.trainer import StudentLoss, enable_activation_checkpointing, teacher_hidden

    cfg, setup = _setup(fixture_dir, tmp_path / "ckpt")
    batch = setup.stream.next()
    grads = []
    for checkpointed in (False, True):
        student = build_student(cfg, setup, [1, 3, 0, 2])
        student.train()
        if checkpointed:
            enable_activation_checkpointing(student)
        calls = []
        student.model.layers[3].mlp.register_forward_hook(lambda *_, c=calls: c.append(1))
        # Early stop would end the recomputation before the (frozen) MLP: switch it off to see the rerun.
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            loss, _ = StudentLoss(student, LossConfig())(batch, teacher_hidden(setup.teacher, batch),
                                                          setup.teacher.lm_head.weight)
            loss.backward()
        assert len(calls) == (2 if checkpointed else 1)  # recomputed in the backward when checkpointed
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if ".mixer." in n})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_weight_decay_spares_a_log_d_biases_and_norms(fixture_dir):
    """AdamW decays the matrices only: A_log / D of every mixer, biases and norm weights sit in the group without
    decay, every trainable parameter in exactly one group; frozen parameters in none."""
    from distill.modeling import convert, load_teacher, set_trainable, weight_decay_groups

    teacher = load_teacher(str(fixture_dir / "teacher"))[0]
    hybrid = convert(teacher, ["t", "m2", "t", "m2"])
    set_trainable(hybrid, "all")
    decay_group, keep_group = weight_decay_groups(hybrid, 0.1)
    assert decay_group["weight_decay"] == 0.1 and keep_group["weight_decay"] == 0.0
    names = {id(p): n for n, p in hybrid.named_parameters()}
    decayed = {names[id(p)] for p in decay_group["params"]}
    kept = {names[id(p)] for p in keep_group["params"]}
    assert not decayed & kept and decayed | kept == set(names.values())
    assert {n for n in names.values() if n.endswith((".A_log", ".D"))} <= kept
    assert any(n.endswith(".A_log") for n in kept) and any("norm" in n for n in kept)
    assert any(n.endswith("in_proj.weight") for n in decayed) and any(n.endswith("q_proj.weight") for n in decayed)
    assert not any(n.endswith(".bias") or "norm" in n for n in decayed)
    set_trainable(hybrid, "mixers")  # frozen attention / MLP weights: in no group
    trainable = {n for n, p in hybrid.named_parameters() if p.requires_grad}
    grouped = {names[id(p)] for g in weight_decay_groups(hybrid, 0.1) for p in g["params"]}
    assert grouped == trainable and all(".mixer." in n for n in grouped)
