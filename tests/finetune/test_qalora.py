"""EfficientDM substrate (MPQ-DM §6.3): LoRA, TALSQ tables, optimiser groups, the loop, resume."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from diffquant.calib.capture import capture_trajectories
from diffquant.config import QuantConfig
from diffquant.diffusion.sampling import build_scheduler
from diffquant.finetune import qalora
from diffquant.finetune.qalora import (
    attach_adapters,
    build_optimizer,
    finetune,
    guided_eps,
    mean_weight_step,
    set_trainable,
)
from diffquant.methods.mpqdm import EfficientDMConfig, MPQDMConfig, run_mpqdm
from diffquant.model import quantize
from diffquant.quant.variants import MixedBitQuantizer

K = 4
TINY = dict(lora_rank=4, stage1_batch=16, batch_size=2, guidance=2.0, steps=K)


@pytest.fixture(scope="module")
def pool(bundle, tmp_path_factory):
    cache = capture_trajectories(bundle, 4, steps=K, guidance=2.0, batch_size=4, progress=False,
                                 cache_dir=tmp_path_factory.mktemp("traj"))
    return MPQDMConfig().select_calibration(cache).with_uncond()


def stage1_model(bundle, pool, config_cls=MPQDMConfig, wbits=3, abits=6, **overrides):
    """A wrapped model after coverage, Stage 1, TALSQ tables and LoRA (epochs=0)."""
    config = config_cls(**{**TINY, **overrides, "epochs": 0})
    qmodel = quantize(bundle.unet, config.wrap_config(QuantConfig(weight_bits=wbits, act_bits=abits)),
                      bundle.example_inputs(2))
    run_mpqdm(qmodel, None, config, calib_set=pool, bundle=bundle, progress=False)
    return qmodel, config


def mixed_layers(qmodel):
    return qmodel.mpq_records["coverage"]["mixed"]


def trajectory_loss(qmodel, bundle, seed=3407, steps=K, guidance=2.0, batch=2) -> float:
    """Σ(ε_q − ε_fp)² along the FP DDIM trajectory of the loop's epoch-0 batch (no update)."""
    sched = build_scheduler(bundle.scheduler_config, "ddim")
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (batch,), generator=gen)
    x = torch.randn(batch, 3, 8, 8, generator=gen)
    total = 0.0
    with torch.no_grad():
        for t in sched.timesteps:
            e_fp = guided_eps(bundle, bundle.unet, x, t, labels, guidance)
            e_q = guided_eps(bundle, qmodel, x, t, labels, guidance)
            total += float((e_q - e_fp).pow(2).sum())
            x = sched.step(e_fp, t, x, eta=0.0).prev_sample
    return total


def test_lora_with_zero_b_leaves_the_layer_unchanged(bundle, pool, unet_inputs):
    qmodel, _ = stage1_model(bundle, pool, lora_rank=0)
    layers = mixed_layers(qmodel)
    args, kwargs = unet_inputs(2, t=int(qmodel.timestep_index.timesteps[0]))
    with torch.no_grad():
        before = qmodel(*args, **kwargs).sample
    attach_adapters(qmodel, layers, rank=3, seed=1)
    lora = qmodel.layers()[layers[0]].weight_delta
    assert lora.rank == 3 and lora.lora_A.abs().sum() > 0 and lora.lora_B.eq(0).all()
    with torch.no_grad():
        assert torch.equal(qmodel(*args, **kwargs).sample, before)
        lora.lora_B.fill_(0.05)  # a non-zero B does change the output (the check can fail)
        assert not torch.equal(qmodel(*args, **kwargs).sample, before)


def test_talsq_tables_have_one_row_per_step_selected_by_timestep(bundle, pool, unet_inputs):
    qmodel, _ = stage1_model(bundle, pool)
    ts = qmodel.timestep_index.timesteps
    assert len(ts) == K and qmodel.plan.timesteps == ts
    acts = qmodel.quantizers("act")
    active = [q for q in acts.values() if q.active]
    assert active and all(q.num_steps == K for q in acts.values())
    for q in active:  # every row starts from the Stage-1 value
        assert torch.equal(q.step, q.step[:1].expand_as(q.step))
    name = mixed_layers(qmodel)[3]
    q = qmodel.layers()[name].act_quantizers[0]
    outs = {}
    for t in (ts[0], ts[2]):
        args, kwargs = unet_inputs(2, t=int(t))
        with torch.no_grad():
            outs[t] = qmodel(*args, **kwargs).sample
    with torch.no_grad():
        q.step[2] *= 3.0  # only calls at t_2 read row 2
    for t in (ts[0], ts[2]):
        args, kwargs = unet_inputs(2, t=int(t))
        with torch.no_grad():
            same = torch.equal(qmodel(*args, **kwargs).sample, outs[t])
        assert same == (t == ts[0])


def test_trainable_parameters_and_optimizer_groups(bundle, pool):
    qmodel, config = stage1_model(bundle, pool)
    layers = mixed_layers(qmodel)
    coverage = qmodel.mpq_records["coverage"]
    options = config.finetune_options(K, 2.0)
    set_trainable(qmodel, layers, options.learn_weight_zero_point)
    trainable = {n for n, p in qmodel.named_parameters() if p.requires_grad}
    for name in layers:
        prefix = f"model.{name}."
        assert {prefix + "weight_delta.lora_A", prefix + "weight_delta.lora_B", prefix + "weight_quantizers.0.step",
                prefix + "weight_quantizers.0.zero_point", prefix + "act_quantizers.0.step",
                prefix + "act_quantizers.0.zero_point"} <= trainable
        assert prefix + "weight" not in trainable and prefix + "input_scale" not in trainable
    for name in coverage["eight_bit"] + coverage["fp"]:
        assert not any(n.startswith(f"model.{name}.") for n in trainable)
    optimizer, scheduler, names = build_optimizer(qmodel, layers, options)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(g["weight_decay"] == 0.01 for g in optimizer.param_groups)
    layer = qmodel.layers()[layers[0]]
    wq = layer.weight_quantizers[0]
    assert isinstance(wq, MixedBitQuantizer)
    by_name = dict(zip(names, optimizer.param_groups))
    assert by_name[f"{layers[0]}:lora"]["lr"] == pytest.approx(float(wq.step[0].detach().mean()) / 2500)
    assert by_name[f"{layers[0]}:weight_qparams"]["lr"] == 1e-6
    assert by_name[f"{layers[0]}:talsq"]["lr"] == 5e-4
    # code variant: the official placeholders (0.005 in the two other group quantizers) join ā
    assert mean_weight_step(layer, "code") == pytest.approx(mean_weight_step(layer) + 0.01)
    # linear decay to 0 over E·K updates
    options = dataclasses.replace(options, epochs=2)
    optimizer, scheduler, _ = build_optimizer(qmodel, layers, options)
    base = [g["lr"] for g in optimizer.param_groups]
    for _ in range(K):
        optimizer.step()
        scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([b / 2 for b in base])
    for _ in range(K):
        optimizer.step()
        scheduler.step()
    assert all(g["lr"] == 0.0 for g in optimizer.param_groups)


def test_efficientdm_learns_the_weight_step_only(bundle, pool):
    qmodel, config = stage1_model(bundle, pool, config_cls=EfficientDMConfig)
    layers = mixed_layers(qmodel)
    set_trainable(qmodel, layers, config.finetune_options(K, 2.0).learn_weight_zero_point)
    wq = qmodel.layers()[layers[0]].weight_quantizers[0]
    assert not isinstance(wq, MixedBitQuantizer) and qmodel.layers()[layers[0]].input_scale is None
    assert wq.step.requires_grad and not wq.zero_point.requires_grad


@pytest.mark.parametrize("trd", [False, True])
def test_one_epoch_lowers_the_eps_loss(bundle, pool, trd):
    qmodel, config = stage1_model(bundle, pool, trd=trd)
    layers = mixed_layers(qmodel)
    before = trajectory_loss(qmodel, bundle)
    options = dataclasses.replace(config.finetune_options(K, 2.0), epochs=1)
    set_trainable(qmodel, layers, options.learn_weight_zero_point)
    state = {n: p.detach().clone() for n, p in qmodel.named_parameters() if p.requires_grad}
    history = finetune(qmodel, bundle.unet, bundle, layers, options, progress=False)
    assert len(history) == 1 and history[0]["eps_loss"] > 0
    assert (history[0]["trd_loss"] > 0) == trd
    after = trajectory_loss(qmodel, bundle)
    assert after < before
    changed = [n for n, p in qmodel.named_parameters() if not torch.equal(p.detach(), state.get(n, p.detach()))]
    assert any("lora_B" in n for n in changed) and any("act_quantizers" in n for n in changed)
    assert not any(p.requires_grad for p in qmodel.parameters())  # frozen again afterwards


def _run(bundle, pool, work_dir, epochs=3):
    config = MPQDMConfig(**{**TINY, "epochs": epochs})
    qmodel = quantize(bundle.unet, config.wrap_config(QuantConfig(weight_bits=3, act_bits=6)),
                      bundle.example_inputs(2))
    run_mpqdm(qmodel, None, config, calib_set=pool, bundle=bundle, work_dir=work_dir, progress=False)
    return qmodel


@pytest.mark.parametrize("interval,rerun_epochs", [(0.0, 1), (3600.0, 3)])
def test_resume_equals_an_uninterrupted_run(bundle, pool, tmp_path, monkeypatch, interval, rerun_epochs):
    """Killed after epoch 2: with a checkpoint after every epoch only the last epoch runs again;
    with time-based checkpoints (only the Stage-1 one written in a fast run) all three do. Either
    way the result equals the uninterrupted run."""
    straight = _run(bundle, pool, tmp_path / "a")
    real_init = qalora.FinetuneCheckpoint.__init__
    monkeypatch.setattr(qalora.FinetuneCheckpoint, "__init__",
                        lambda self, *a, **k: real_init(self, *a, **{**k, "min_interval_s": interval}))
    original_save = qalora.FinetuneCheckpoint.save

    def save_then_stop(self, qmodel, epoch, *args, **kwargs):
        original_save(self, qmodel, epoch, *args, **kwargs)
        if epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(qalora.FinetuneCheckpoint, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _run(bundle, pool, tmp_path / "b")
    monkeypatch.setattr(qalora.FinetuneCheckpoint, "save", original_save)
    calls = []
    monkeypatch.setattr(qalora, "_update", lambda *a, _f=qalora._update: (calls.append(1), _f(*a)))
    resumed = _run(bundle, pool, tmp_path / "b")
    assert len(calls) == K * rerun_epochs
    assert resumed.mpq_records["history"] == straight.mpq_records["history"]
    assert resumed.mpq_records["stage1"] == straight.mpq_records["stage1"]
    a, b = straight.quant_state_dict(), resumed.quant_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
