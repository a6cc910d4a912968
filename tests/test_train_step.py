"""The compiled train steps on a device mesh: sharding invariance, gradients, bank, training."""

from __future__ import annotations

import dataclasses
import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import synthetic_batch, tiny_config

from mvmae_jax import bank as bank_lib
from mvmae_jax import losses, masking, models, optim, sharding, tasks, utils
from mvmae_jax import train_step as ts

WARMUP = masking.WARMUP_PHASE

NUM_EXAMPLES = 40


@dataclasses.dataclass
class Setup:
    config: object
    task: tasks.PretrainTask
    mesh: jax.sharding.Mesh
    schedule: object
    optimizer: object
    state_sharding: object
    steps: dict
    refresh: object
    initial_state: ts.TrainState

    @property
    def model(self) -> models.MVMAE:
        return self.task.model

    def new_state(self) -> ts.TrainState:
        """A fresh copy of the initial state (the steps donate theirs)."""
        return jax.tree.map(jnp.copy, self.initial_state)

    def shard(self, batch):
        return sharding.shard_batch(batch, self.mesh)


def make_setup(config, num_devices: int, total_steps: int = 100,
               warmup_steps: int = 5) -> Setup:
    mesh = sharding.config_mesh(config.sharding, jax.devices()[:num_devices])
    task = tasks.PretrainTask(config, mesh, SimpleNamespace(num_examples=NUM_EXAMPLES))
    schedule = optim.learning_rate_schedule(config.optim, config.batch_size, warmup_steps,
                                            total_steps)
    optimizer = task.optimizer(schedule)
    state = ts.create_train_state(task, optimizer, mesh, config)
    state_sharding = ts.state_shardings(state, mesh, config)
    steps = {phase: ts.make_train_step(task, optimizer, schedule, mesh, state_sharding, phase)
             for phase in task.phases}
    refresh = None
    if task.masking.uses_bank:
        def refresh_step(state, batch):
            batch = dict(batch, image=task.pixels(batch["image"]))
            bank = task.masking.refresh_bank(state.params, state.extras["bank"], batch)
            return state.replace(extras=dict(state.extras, bank=bank))

        refresh = jax.jit(refresh_step, donate_argnums=0)
    return Setup(config, task, mesh, schedule, optimizer, state_sharding, steps, refresh, state)


def make_masks(setup: Setup, phase: str, params, bank, batch, rng) -> masking.Masks:
    """The step's masks, compiled (eager op-by-op dispatch is slow on the CPU), of a batch
    whose views are normalised as the step does it."""
    fn = functools.partial(setup.task.masking.masks, phase=phase)
    return jax.jit(fn)(params, bank, dict(batch, views=model_views(setup, batch)), rng)


def model_views(setup: Setup, batch) -> jax.Array:
    """The batch's uint8 views as the model sees them: normalised."""
    return setup.task.pixels(jnp.asarray(batch["views"]))


def refresh_batch(batch):
    return dict(image=batch["views"][:, 0], index=batch["index"])


def run_phases(setup: Setup, batch) -> tuple[ts.TrainState, list[dict]]:
    """One random-phase step, a bank refresh, one AMT step; host copies of the metrics."""
    state = setup.new_state()
    metrics = []
    state, m = setup.steps[WARMUP](state, setup.shard(batch))
    metrics.append(jax.device_get(m))
    state = setup.refresh(state, setup.shard(refresh_batch(batch)))
    state, m = setup.steps["amt"](state, setup.shard(batch))
    metrics.append(jax.device_get(m))
    return state, metrics


@pytest.fixture(scope="module")
def config():
    return tiny_config(batch_size=16)


@pytest.fixture(scope="module")
def setup8(config):
    return make_setup(config, 8)


@pytest.fixture(scope="module")
def batch(config):
    return synthetic_batch(np.random.default_rng(0), config.batch_size, config.img_size,
                           num_examples=NUM_EXAMPLES)


def test_one_device_equals_eight_devices(config, setup8, batch):
    """Loss and metrics of both phases, and the parameters after, do not depend on the mesh."""
    setup1 = make_setup(config, 1)
    state1, metrics1 = run_phases(setup1, batch)
    state8, metrics8 = run_phases(setup8, batch)
    for m1, m8 in zip(metrics1, metrics8, strict=True):
        assert set(m1) == {"loss", "rec_loss", "con_loss", "con_top1", "grad_norm", "lr",
                           "finite"}
        for key in m1:
            np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, atol=1e-7, err_msg=key)
    flat1 = jax.tree_util.tree_flatten_with_path(state1.params)[0]
    for (path, p1), p8 in zip(flat1, jax.tree.leaves(state8.params), strict=True):
        name = jax.tree_util.keystr(path)
        if "'key']['bias'" in name:
            # Softmax is invariant to the key bias: its true gradient is 0 and what is left is
            # rounding noise, which Adam's normalisation blows up to a full step.
            continue
        np.testing.assert_allclose(np.asarray(p8), np.asarray(p1), rtol=1e-4, atol=1e-6,
                                   err_msg=name)
    np.testing.assert_allclose(np.asarray(state8.extras["bank"]),
                               np.asarray(state1.extras["bank"]), atol=1e-6)
    assert state8.extras["bank"].sharding.spec == bank_lib.bank_spec(setup8.mesh)


def test_fsdp_meshes_give_the_losses_of_data_parallelism(batch):
    """FSDP on the (data, fsdp) meshes (4, 2) and (2, 4) of 8 devices gives the losses of
    (8, 1), data parallelism, in both phases (the AMT one reads the bank, split over both
    axes); a device holds less of the state the more devices share a copy of it."""
    results = {}
    for fsdp in (1, 2, 4):
        config = tiny_config(batch_size=16, **{"sharding.strategy": "fsdp",
                                               "sharding.fsdp_axis_size": fsdp,
                                               "sharding.fsdp_min_size": 0})
        setup = make_setup(config, 8)
        assert dict(setup.mesh.shape) == {"data": 8 // fsdp, "fsdp": fsdp}
        state, metrics = run_phases(setup, batch)
        results[fsdp] = metrics, utils.state_bytes(state)[0]
    for fsdp in (2, 4):
        for metrics, reference in zip(results[fsdp][0], results[1][0], strict=True):
            for key in ("loss", "rec_loss", "con_loss", "grad_norm"):
                np.testing.assert_allclose(metrics[key], reference[key], rtol=1e-5,
                                           err_msg=f"fsdp {fsdp}: {key}")
    assert results[1][1] > results[2][1] > results[4][1], results


def test_contrastive_metrics_span_the_global_batch(setup8, batch):
    """The step's contrastive loss and top-1 are those of all 2B views, not per device."""
    config, model = setup8.config, setup8.model
    state = setup8.new_state()
    rng = jax.random.fold_in(state.rng, state.step)
    masks = make_masks(setup8, WARMUP, state.params,
                          state.extras.get("bank"), batch, rng)
    views = model_views(setup8, batch).reshape((-1,) + batch["views"].shape[2:])
    flat_masks = jax.tree.map(lambda m: m.reshape(views.shape[0], -1), masks)
    embeddings = np.asarray(jax.jit(model.apply)({"params": state.params}, views, flat_masks)[
        "embeddings"]).reshape(config.batch_size, 2, -1)
    global_loss, global_top1 = losses.info_nce_loss(embeddings, config.contrastive.temperature)
    per_device = [losses.info_nce_loss(embeddings[i:i + 2], config.contrastive.temperature)[0]
                  for i in range(0, config.batch_size, 2)]
    _, metrics = setup8.steps[WARMUP](state, setup8.shard(batch))
    np.testing.assert_allclose(metrics["con_loss"], global_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["con_top1"], global_top1, rtol=1e-6)
    assert abs(float(np.mean(per_device)) - float(global_loss)) > 0.1


def test_encoder_gets_gradient_from_both_losses(setup8, batch):
    """Encoder: gradient from reconstruction and from contrast; decoder only from the first."""
    state = setup8.new_state()
    masks = make_masks(setup8, WARMUP, state.params,
                          state.extras.get("bank"), batch, jax.random.PRNGKey(3))
    loss_fn = setup8.task.loss

    @jax.jit
    def both_grads(params):
        def metric(name):
            return lambda p: loss_fn(p, model_views(setup8, batch), masks)[1][name]
        return jax.grad(metric("rec_loss"))(params), jax.grad(metric("con_loss"))(params)

    def norm(tree):
        return float(optax_norm(tree))

    rec, con = both_grads(state.params)
    assert norm(rec["encoder"]) > 1e-4 and norm(con["encoder"]) > 1e-4
    assert norm(rec["decoder"]) > 1e-4 and norm(con["decoder"]) == 0.0
    assert norm(rec["projection"]) == 0.0 and norm(con["projection"]) > 1e-4
    for block in ("embedding", "cls"):
        assert norm(rec["encoder"][block]) > 0 and norm(con["encoder"][block]) > 0


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_bank_gets_no_gradient_and_no_update_from_training(setup8, batch):
    """The bank only steers which patches are masked: zero gradient, unchanged by a step."""
    state = setup8.new_state()
    state = setup8.refresh(state, setup8.shard(refresh_batch(batch)))
    bank_before = np.asarray(state.extras.get("bank"))
    loss_fn = setup8.task.loss

    def loss_of_bank(bank):
        masks = make_masks(setup8, "amt", state.params, bank,
                              batch, jax.random.PRNGKey(0))
        return loss_fn(state.params, model_views(setup8, batch), masks)[0]

    bank_grad = jax.jit(jax.grad(loss_of_bank))(jnp.asarray(bank_before))
    np.testing.assert_array_equal(np.asarray(bank_grad), 0.0)
    state, _ = setup8.steps["amt"](state, setup8.shard(batch))
    np.testing.assert_array_equal(np.asarray(state.extras.get("bank")), bank_before)


def test_position_embeddings_are_constants(setup8):
    """No position-embedding parameter or optimizer slot; the table is MAE's sin-cos."""
    state = setup8.new_state()
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path((state.params, state.opt_state))[0]]
    assert paths and not [p for p in paths if "pos" in p.lower()]
    encoder = models.VisionTransformer(**models.encoder_dims(setup8.config.model))
    params = jax.tree.map(jnp.zeros_like, state.params["encoder"])
    tokens = encoder.apply({"params": params}, jnp.zeros((1, 16, 16, 3)),
                           method=models.VisionTransformer.patch_tokens)
    np.testing.assert_allclose(tokens[0], models.sincos_2d((4, 4), 32), atol=1e-7)


def test_bank_refresh_stores_each_examples_map(setup8, batch):
    """Refresh writes attention_maps(image) to the example's row; -1 padding is skipped."""
    state = setup8.new_state()
    padded = refresh_batch(batch)
    padded["index"] = padded["index"].copy()
    padded["index"][-3:] = -1
    state = setup8.refresh(state, setup8.shard(padded))
    maps = jax.jit(functools.partial(setup8.model.apply, method=models.MVMAE.attention_maps))(
        {"params": state.params}, setup8.task.pixels(padded["image"]))
    bank = np.asarray(state.extras.get("bank"))
    np.testing.assert_allclose(bank[padded["index"][:-3]], np.asarray(maps)[:-3], atol=1e-6)
    untouched = np.setdiff1d(np.arange(bank.shape[0]), padded["index"][:-3])
    np.testing.assert_array_equal(bank[untouched], 1.0)


def test_amt_masks_come_from_the_aligned_bank(setup8, batch):
    """In the AMT phase the masks are Gumbel-sorted on the bank rows aligned to each view."""
    config, model = setup8.config, setup8.model
    state = setup8.new_state()
    rng = np.random.default_rng(5)
    table = rng.random(np.asarray(state.extras.get("bank")).shape).astype(np.float32)
    bank = jax.device_put(table, state.extras.get("bank").sharding)
    boxed = dict(batch, boxes=np.tile(np.array([0.25, 0.0, 0.5, 0.75], np.float32),
                                      (config.batch_size, 2, 1)))
    key = jax.random.PRNGKey(9)
    masks = make_masks(setup8, "amt", state.params, bank, boxed,
                          key)
    weights = masking.align_bank_maps(table[boxed["index"]], boxed["boxes"], boxed["flips"],
                                      model.grid_size)
    n_mask, n_throw, _ = setup8.task.masking.counts("amt")
    expected = masking.amt_masking(key, weights.reshape(-1, model.num_patches),
                                   num_masked=n_mask, num_thrown=n_throw)
    for got, want in zip(masks, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(got).reshape(want.shape), want)


def test_online_source_masks_follow_the_current_encoder(batch):
    """amt.source='online': weights are the maps of each view under the current params."""
    config = tiny_config(batch_size=16, **{"amt.source": "online"})
    setup = make_setup(config, 8)
    state = setup.new_state()
    assert "bank" not in state.extras
    key = jax.random.PRNGKey(2)
    masks = make_masks(setup, "amt", state.params, None,
                          batch, key)
    views = model_views(setup, batch).reshape((-1,) + batch["views"].shape[2:])
    maps = jax.jit(functools.partial(setup.model.apply, method=models.MVMAE.attention_maps))(
        {"params": state.params}, views)
    expected = masking.amt_masking(key, maps, num_masked=8, num_thrown=4)
    np.testing.assert_array_equal(np.asarray(masks.masked).reshape(32, -1), expected.masked)
    state, metrics = setup.steps["amt"](state, setup.shard(batch))
    assert np.isfinite(float(metrics["loss"]))


def test_gradient_accumulation_matches_one_big_batch(batch):
    """Reconstruction-only MAE: 2 microbatches give the same step as the whole batch."""
    overrides = {"views.num": 1, "masking.strategy": "random", "masking.mask_ratio": 0.75,
                 "masking.throw_ratio": 0.0, "optim.grad_clip_norm": 1.0}
    one_view = dict(batch, views=batch["views"][:, :1], boxes=batch["boxes"][:, :1],
                    flips=batch["flips"][:, :1])
    results = []
    for accum in (1, 2):
        config = tiny_config(batch_size=16, grad_accum_steps=accum, **overrides)
        setup = make_setup(config, 8)
        state, metrics = setup.steps["random"](setup.new_state(), setup.shard(one_view))
        results.append((jax.device_get(metrics), jax.device_get(state.params)))
    (m1, p1), (m2, p2) = results
    assert "con_loss" not in m1
    for key in ("loss", "rec_loss", "grad_norm"):
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_step_donates_state_and_makes_no_host_transfer(setup8, batch):
    """The step runs with transfers disallowed and consumes (donates) the old state."""
    state = setup8.new_state()
    device_batch = setup8.shard(batch)
    step = setup8.steps[WARMUP]
    state, _ = step(state, device_batch)  # compile outside the guard
    old_leaf = jax.tree.leaves(state.params)[0]
    with jax.transfer_guard("disallow"):
        state, metrics = step(state, device_batch)
    assert old_leaf.is_deleted()
    assert int(state.step) == 2 and np.isfinite(float(metrics["loss"]))


def policy(config, num_patches: int = 196) -> masking.MaskingPolicy:
    return masking.MaskingPolicy(config, SimpleNamespace(num_patches=num_patches), mesh=None)


def test_extras_are_placed_as_their_spec_says():
    """An extra marked "params" is split like the parameters, one with a function gets that
    function's spec, and one without a spec is replicated."""
    config = tiny_config()
    config.sharding.strategy, config.sharding.fsdp_min_size = "fsdp", 1
    config.sharding.fsdp_rules = [(".*", "largest")]
    mesh = sharding.make_mesh(fsdp_axis_size=4)
    kernel = jnp.zeros((16, 8))
    state = ts.TrainState(
        step=jnp.int32(0), params={"kernel": kernel}, opt_state=(), rng=jax.random.PRNGKey(0),
        extras={"frozen": {"kernel": kernel}, "bank": jnp.zeros((8, 3)), "stats": jnp.ones(4)},
        extras_spec=(("frozen", ts.ExtraSpec(sharding="params")),
                     ("bank", ts.ExtraSpec(sharding=bank_lib.bank_spec))))
    placed = ts.state_shardings(state, mesh, config)
    assert placed.params["kernel"].spec == jax.sharding.PartitionSpec("fsdp", None)
    assert placed.extras["frozen"]["kernel"] == placed.params["kernel"]
    assert placed.extras["bank"].spec == bank_lib.bank_spec(mesh)
    assert placed.extras["stats"].is_fully_replicated and placed.extras_spec == state.extras_spec


def test_phase_schedule():
    """Warm-up phase before amt.start_epoch, refreshes every refresh_every epochs from it."""
    amt = policy(tiny_config(**{"amt.start_epoch": 40, "amt.refresh_every": 40}))
    assert amt.phases == (WARMUP, "amt")
    assert amt.phase_at_epoch(39) == WARMUP
    assert amt.phase_at_epoch(40) == "amt"
    assert [e for e in range(200) if amt.bank_refresh_due(e)] == [40, 80, 120, 160]
    assert amt.counts(WARMUP) == (147, 0, 49)
    assert amt.counts("amt") == (98, 49, 49)  # tiny_config: mask 0.5, throw 0.25
    mvmae = policy(tiny_config(**{"masking.strategy": "random", "masking.mask_ratio": 0.8,
                                  "masking.throw_ratio": 0.0}))
    assert mvmae.phases == ("random",)
    assert mvmae.phase_at_epoch(0) == mvmae.phase_at_epoch(100) == "random"
    assert mvmae.counts("random") == (156, 0, 40)
    assert not mvmae.bank_refresh_due(40)
    no_warmup = policy(tiny_config(**{"amt.start_epoch": 0, "amt.refresh_every": 5}))
    assert no_warmup.phases == ("amt",)
    assert [e for e in range(12) if no_warmup.bank_refresh_due(e)] == [0, 5, 10]


def test_a_strategy_registered_here_runs_in_the_step(batch):
    """A new masking strategy is one registered function plus the config value: masking the
    lowest-attention patches (the bank's aligned maps) trains with the trainer's own step."""
    name = "lowest_attention_for_test"

    @masking.register_strategy(name, uses_attention=True)
    def lowest_attention(rng, shape, weights, num_masked, num_thrown):
        del rng, shape
        return masking.split_order(jnp.argsort(weights, axis=-1), num_masked, num_thrown)

    try:
        config = tiny_config(batch_size=16, **{"masking.strategy": name})
        setup = make_setup(config, 8)
        assert setup.task.phases == (WARMUP, name)
        state = setup.refresh(setup.new_state(), setup.shard(refresh_batch(batch)))
        masks = make_masks(setup, name, state.params, state.extras["bank"], batch,
                           jax.random.PRNGKey(0))
        weights = np.asarray(jax.jit(setup.task.masking.weights)(
            state.params, state.extras["bank"], batch))
        n_mask, n_throw, _ = setup.task.masking.counts(name)
        masked = np.asarray(masks.masked).reshape(weights.shape[0], n_mask)
        # Every masked patch has a lower weight than every visible one.
        visible = np.asarray(masks.visible).reshape(weights.shape[0], -1)
        rows = np.arange(weights.shape[0])[:, None]
        assert np.all(weights[rows, masked].max(1) <= weights[rows, visible].min(1))
        state, metrics = setup.steps[name](state, setup.shard(batch))
        assert np.isfinite(float(metrics["loss"])) and float(metrics["finite"]) == 1.0
    finally:
        del masking.STRATEGIES[name]


def test_gradient_cache_matches_one_big_batch_with_contrast(batch):
    """MV-MAE with the contrastive loss: 2 microbatches (gradient cache) give the loss, the
    metrics and the gradients of the whole batch, negatives from all of it (4 devices)."""
    results = []
    for accum in (1, 2):
        config = tiny_config(batch_size=16, grad_accum_steps=accum)
        setup = make_setup(config, 4)
        state = setup.new_state()
        grads, metrics, _ = jax.jit(functools.partial(setup.task.gradients, phase=WARMUP))(
            state.params, state.extras, setup.shard(batch), jax.random.PRNGKey(4))
        results.append((jax.device_get(metrics), jax.device_get(grads)))
    (m1, g1), (m2, g2) = results
    for key in ("loss", "rec_loss", "con_loss", "con_top1"):
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, err_msg=key)
    # Relative to the largest gradient: the attention key bias's true gradient is 0 (softmax
    # ignores it) and both sides hold rounding noise there.
    scale = max(float(np.abs(a).max()) for a in jax.tree.leaves(g1))
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g1)[0], jax.tree.leaves(g2),
                            strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * scale,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_tiny_model_trains_and_both_losses_fall():
    """50 steps (10 warm-up, bank refresh, 40 AMT) on a fixed pool: both losses fall."""
    config = tiny_config(batch_size=16, **{"optim.base_lr": 2e-2})
    setup = make_setup(config, 8, total_steps=50, warmup_steps=5)
    rng = np.random.default_rng(0)
    pool = [synthetic_batch(rng, 16, 16, num_examples=NUM_EXAMPLES) for _ in range(4)]
    state = setup.new_state()
    history = []
    for step in range(50):
        batch = pool[step % len(pool)]
        if step == 10:
            for b in pool:
                state = setup.refresh(state, setup.shard(refresh_batch(b)))
        phase = WARMUP if step < 10 else "amt"
        state, metrics = setup.steps[phase](state, setup.shard(batch))
        history.append(jax.device_get(metrics))
    for key in ("rec_loss", "con_loss"):
        first = np.mean([h[key] for h in history[:5]])
        last = np.mean([h[key] for h in history[-5:]])
        assert last < 0.8 * first, (key, first, last)
    assert np.mean([h["con_top1"] for h in history[-5:]]) > 0.5
