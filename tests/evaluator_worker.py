"""The worker of tests/test_evaluators.py's multi-process test: builds the kNN and classification
evaluators on the digits with a tiny random encoder, runs each twice and writes the metrics to
OUT_DIR/process_<index>.json.

Run alone (one process) or by launch/local_multiprocess.sh through a stand-in interpreter that
replaces `-m mvmae_jax.main` with this file; the launcher adds the coordinator flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for helpers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--coordinator_address")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from mvmae_jax import distributed
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)

    import jax
    import jax.numpy as jnp
    import ml_collections
    from helpers import tiny_config

    from mvmae_jax import evaluators, input_pipeline, models, sharding

    config = tiny_config(**{"batch_size": 64, "dataset.data_dir": args.data_dir})
    config.evals = ml_collections.ConfigDict(dict(
        knn=dict(type="knn", every_steps=0, train_examples=0, k=20, temperature=0.07,
                 feature="cls", batch_size=0),
        classification=dict(type="classification", every_steps=0, batch_size=32),
    ))
    mesh = sharding.make_mesh()
    by_split = {"train": input_pipeline.make_source(config),
                "eval": input_pipeline.make_source(config, train=False)}
    size, patch, width = config.img_size, 4, 32
    grid = size // patch

    def encode(params, images):  # patches → a random projection; [CLS] is their mean
        images = models.normalise_pixels(images, config.input.mean, config.input.std)
        b = images.shape[0]
        patches = images.reshape(b, grid, patch, grid, patch, 3).transpose(0, 1, 3, 2, 4, 5)
        tokens = jnp.tanh(patches.reshape(b, grid * grid, -1) @ params["embed"])
        return jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)

    def logits(params, images):
        return encode(params, images)[:, 0] @ params["head"]

    def init():
        embed_key, head_key = jax.random.split(jax.random.key(0))
        return {"embed": jax.random.normal(embed_key, (patch * patch * 3, width)),
                "head": jax.random.normal(head_key, (width, 10))}

    params = jax.jit(init, out_shardings=sharding.replicated(mesh))()
    ctx = evaluators.EvalContext(
        config=config, mesh=mesh, num_classes=by_split["train"].num_classes,
        batches=lambda split, batch_size, max_examples: input_pipeline.EvalBatches(
            config, mesh, by_split[split], batch_size, max_examples=max_examples),
        encode=encode, logits=logits)
    built = evaluators.make_evaluators(ctx)
    runs = []
    for _ in range(2):
        result = {}
        for evaluator in built:
            result.update(evaluator.run(params))
        runs.append(result)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, f"process_{jax.process_index()}.json"), "w") as f:
        json.dump({"process_count": jax.process_count(), "device_count": jax.device_count(),
                   "evaluators": [e.name for e in built], "runs": runs}, f)
    logging.info("Done: %s", runs)


if __name__ == "__main__":
    main()
