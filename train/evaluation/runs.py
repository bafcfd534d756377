"""Trained runs evaluated on 1, 10 or 144 crops per image, alone and as an ensemble (section 4.3).

Why here and not in the trainer: evaluation must read any finished run, of any model, without
writing into its folder. `restore_run` rebuilds a run from its config.json and newest checkpoint
that loads; `evaluate_runs` passes every view of `crops` through each model once, and reads the
single models and the ensemble (the mean of the class probabilities) off those same passes.

Example (`keras-bn-train --experiment=evaluate --model_dir=runs/a,runs/b --eval_crops=1,144`)::

    from keras_bn.train.evaluation.runs import evaluate_runs

    result = evaluate_runs(["runs/bn_x30", "runs/bn_x30_seed1"], num_crops=(1, 144))
    print(result["accuracy"]["144"]["ensemble"], result["accuracy"]["144"]["models"])
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_bn.train.config import settings as config_lib
from keras_bn.train.data import pipeline as data_lib
from keras_bn.train.engine import strategy as strategy_lib
from keras_bn.train.engine.trainer import Trainer
from keras_bn.train.evaluation import crops
from keras_bn.train.messages import say
from keras_bn.train.rundir import checkpoints
from keras_bn.train.rundir.folder import RunDir


def load_config(model_dir: str) -> config_lib.TrainConfig:
    """The configuration a training run saved in its `config.json`.

    Raises:
        ValueError: if `model_dir` holds no training run.
    """
    run_dir = RunDir(model_dir)
    if not run_dir.config_path.is_file():
        raise ValueError(
            f"--model_dir={model_dir} holds no {run_dir.config_path.name}; pass the folder of a "
            "training run."
        )
    saved = json.loads(run_dir.config_path.read_text())
    if "model" not in saved:  # e.g. an --experiment=figure1 folder
        raise ValueError(f"--model_dir={model_dir} holds an experiment, not one training run.")
    fields = {k: v for k, v in saved.items() if k in config_lib.field_names()}
    config = config_lib.TrainConfig(**fields)
    config_lib.validate(config)
    return config


def restore_run(model_dir: str) -> Trainer:
    """A trainer holding the run's model as of its newest checkpoint that loads.

    The model is built with the run's dtype policy; the caller's policy is left as it was.

    Raises:
        ValueError: if the folder holds no run or no checkpoint that loads.
    """
    config = load_config(model_dir)
    found = checkpoints.find_restorable(RunDir(model_dir).checkpoint_dir)
    if found.path is None:
        reasons = "; ".join(found.describe()) or "no checkpoint written yet"
        raise ValueError(f"--model_dir={model_dir} has no checkpoint that loads ({reasons}).")
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(strategy_lib.dtype_policy(config.mixed_precision))
    try:
        # chief=False: the trainer reads the run's checkpoints and writes nothing into its folder.
        trainer = Trainer(
            config,
            tf.distribute.get_strategy(),
            data_lib.make_data(config),
            RunDir(model_dir),
            chief=False,
        )
    finally:
        keras.config.set_dtype_policy(previous_policy)
    trainer.restore(found)
    return trainer


def view_probabilities(
    model,
    crop_size: int,
    batches,
    num_crops: int,
    progress: Callable[[int], None] | None = None,
    whole: Callable | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each image's class probabilities, averaged over its `num_crops` views.

    Args:
        model: a `keras.Model` giving logits, or any callable `crops.probability_fn` takes.
        crop_size: the side of the model's square input.
        batches: `(raw images, labels)` pairs, as `Data.raw_eval_batches` gives them.
        num_crops: 1, 10 or 144.
        progress: called with the number of images done after each batch.
        whole: instead of crops, the one view of a model that takes whole images (the MLP's
            flat vectors): the run's own evaluation preprocessing (`Data.preprocess_batch`).

    Returns:
        `(probabilities (N, classes), labels (N,))`.

    Raises:
        ValueError: if `batches` holds no image.
    """
    probability = crops.probability_fn(model)
    make_views = tf.function(crops.crop_views, reduce_retracing=True)
    outputs, labels, done = [], [], 0
    for images, batch_labels in batches:
        if whole is not None:
            outputs.append(probability(whole(tf.convert_to_tensor(images))).numpy())
        else:
            views = make_views(tf.convert_to_tensor(images), crop_size, num_crops)
            outputs.append(crops.average_over_views(probability, views).numpy())
        labels.append(np.reshape(np.asarray(batch_labels), [-1]))
        done += len(labels[-1])
        if progress is not None:
            progress(done)
    if not done:
        raise ValueError("there is no image to evaluate.")
    return np.concatenate(outputs), np.concatenate(labels)


def ensemble(probabilities: Sequence[np.ndarray]) -> np.ndarray:
    """The ensemble's class probabilities: the mean of its members' (section 4.3).

    The paper averages probabilities, not logits. With each member already averaged over the
    same views, this is the mean over all (member, view) pairs.

    Raises:
        ValueError: for no member, or members that disagree on the number of classes.
    """
    if not len(probabilities):
        raise ValueError("an ensemble needs at least one model; received none.")
    classes = sorted({np.shape(p)[-1] for p in probabilities})
    if len(classes) != 1:
        raise ValueError(
            f"the ensemble's models predict different numbers of classes ({classes}); every "
            "member must have the same output layer."
        )
    return np.mean(probabilities, axis=0)


def top1(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose most probable class is the label."""
    return float(np.mean(np.argmax(probabilities, axis=-1) == labels))


def evaluate_runs(
    model_dirs: Sequence[str],
    num_crops: Sequence[int] = (1,),
    max_images: int | None = None,
    verbose: int = 1,
) -> dict[str, Any]:
    """Top-1 accuracy of each run and of their ensemble, for each crop count.

    Args:
        model_dirs: trained runs of one model input size and class count; the first run's
            configuration names the evaluation images.
        num_crops: crop counts, each one of `crops.NUM_CROPS` (the command line checks
            `--eval_crops` before anything runs; `crops.views` refuses another count).
        max_images: evaluate at most this many of those images.
        verbose: 0 silent, else one line per (model, crop count).

    Returns:
        `{"model_dirs", "images", "seconds", "accuracy": {"<crops>": {"models": [...],
        "ensemble": float}}}` (the ensemble of one model is that model).

    Raises:
        ValueError: for a folder that holds no trained run, an unknown crop count, or runs whose
            inputs or classes differ.
    """
    if not model_dirs:
        raise ValueError("--model_dir names no run to evaluate.")
    started = time.perf_counter()
    trainers = [restore_run(d) for d in model_dirs]
    first = trainers[0]
    shapes = {(t.data.spec.input_shape, t.data.spec.num_classes) for t in trainers}
    if len(shapes) > 1:
        raise ValueError(
            f"the runs differ in input shape or classes ({sorted(shapes)}); an ensemble needs "
            "models of the same inputs and outputs."
        )
    flat = first.data.spec.flat
    if flat and tuple(num_crops) != (1,):
        raise ValueError(
            f"--eval_crops={','.join(map(str, num_crops))}: {first.config.model} takes whole "
            "images as flat vectors, which have no crops; use --eval_crops=1."
        )
    result: dict[str, Any] = {"model_dirs": list(model_dirs), "accuracy": {}}
    for n in num_crops:
        per_model, labels = [], None
        for model_dir, trainer in zip(model_dirs, trainers, strict=True):
            t0 = time.perf_counter()
            probabilities, labels = view_probabilities(
                trainer.model,
                trainer.data.spec.input_shape[0],
                first.data.raw_eval_batches(max_images),
                n,
                whole=trainer.data.preprocess_batch if flat else None,
            )
            per_model.append(probabilities)
            if verbose:
                say(
                    f"evaluate: {model_dir} (step {trainer.current_step}), {n} crop(s) on "
                    f"{len(labels)} images: top-1 {top1(probabilities, labels):.4f} "
                    f"({time.perf_counter() - t0:.0f} s)"
                )
        result["images"] = len(labels)
        result["accuracy"][str(n)] = {
            "models": [top1(p, labels) for p in per_model],
            "ensemble": top1(ensemble(per_model), labels),
        }
    result["seconds"] = time.perf_counter() - started
    return result
