"""The train state of every task, its sharding, and the compiled train step: the task computes
the gradients of a batch of global arrays, the step applies the optimizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mvmae_jax import sharding


class ExtraSpec(NamedTuple):
    """How an entry of `TrainState.extras` is placed: "replicated", "params" (like the parameters)
    or mesh → PartitionSpec; and checkpointed: in the state item (None) or an item of its own,
    restored with its leading rows padded or cut."""
    sharding: str | Callable = "replicated"
    item: str | None = None


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # what the optimizer updates
    opt_state: Any
    rng: jax.Array  # base PRNG key; each step folds in its step number
    # What the task keeps besides (the AMT bank, a frozen encoder, BatchNorm statistics), and
    # the specs the task declares for them (static).
    extras: dict[str, Any]
    extras_spec: tuple[tuple[str, ExtraSpec], ...] = flax.struct.field(
        pytree_node=False, default=())

    def extra_spec(self, name: str) -> ExtraSpec:
        return dict(self.extras_spec).get(name, ExtraSpec())


def step_key(state: TrainState) -> jax.Array:
    """The PRNG key of the step about to run, from the step number alone (exact resumes)."""
    return jax.random.fold_in(state.rng, state.step)


def state_shardings(state: TrainState, mesh: Mesh,
                    config: ml_collections.ConfigDict | None = None) -> TrainState:
    """The state's shardings: parameters as `config.sharding` says (replicated without it),
    optimizer moments like their parameters, extras as their `ExtraSpec` says."""
    sharding_config = None if config is None else config.sharding
    replicated = sharding.replicated(mesh)
    params = sharding.param_shardings(state.params, mesh, sharding_config)

    def place_extra(name, value):
        how = state.extra_spec(name).sharding
        if how == "params":
            return sharding.param_shardings(value, mesh, sharding_config)
        placed = NamedSharding(mesh, how(mesh)) if callable(how) else replicated
        return jax.tree.map(lambda _: placed, value)

    return state.replace(
        step=replicated, params=params,
        opt_state=sharding.follow_params(state.opt_state, state.params, params, mesh),
        rng=replicated,
        extras={name: place_extra(name, value) for name, value in state.extras.items()})


def create_train_state(task: Any, optimizer: optax.GradientTransformation, mesh: Mesh,
                       config: ml_collections.ConfigDict) -> TrainState:
    """Initialises the state directly in its sharding (no host copy of the parameters)."""
    def init():
        params_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
        params, extras = task.init(params_rng)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params), rng=state_rng, extras=extras,
                          extras_spec=tuple(task.extras_spec.items()))

    shapes = jax.eval_shape(init)
    return jax.jit(init, out_shardings=state_shardings(shapes, mesh, config))()


def split_microbatches(tree: Any, num_micro: int, mesh: Mesh) -> Any:
    """(B, ...) → (num_micro, B / num_micro, ...): microbatch j takes examples j, j + k, ..., so
    each is spread over all devices and every device keeps its own examples."""
    def split(x):
        x = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, PartitionSpec(None, mesh.axis_names)))

    return jax.tree.map(split, tree)


def accumulate_gradients(grad_fn: Callable, params: Any, micro: Any) -> tuple[Any, Any]:
    """(summed grads, stacked aux) of `grad_fn(params, microbatch)` over the leading axis of
    `micro`, one microbatch's activations alive at a time."""
    def add(grad_sum, microbatch):
        grads, aux = grad_fn(params, microbatch)
        return jax.tree.map(jnp.add, grad_sum, grads), aux

    return jax.lax.scan(add, jax.tree.map(jnp.zeros_like, params), micro)


def all_finite(tree: Any) -> jax.Array:
    """True when every value of every floating leaf is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_state_check(mesh: Mesh, state_sharding: TrainState) -> Callable[[TrainState], bool]:
    """state → whether all of it is finite; the loop checks before each checkpoint."""
    check = jax.jit(all_finite, in_shardings=(state_sharding,),
                    out_shardings=sharding.replicated(mesh))
    return lambda state: bool(jax.device_get(check(state)))


def make_train_step(task: Any, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, mesh: Mesh, state_sharding: TrainState,
                    phase: str) -> Callable[[TrainState, dict], tuple]:
    """The compiled step of one phase: (state, batch) → (state, metrics), the state donated; metrics
    are the task's, `grad_norm` (before clipping), `lr` and `finite`."""
    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        grads, metrics, extras = task.gradients(state.params, state.extras, batch,
                                                step_key(state), phase)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["lr"] = schedule(state.step)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        metrics["finite"] = finite.astype(jnp.float32)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state, extras=extras), metrics

    return jax.jit(train_step, in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0)
