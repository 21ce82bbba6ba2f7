"""Issue 10's switches end to end on configs/tiny.py (64 px shapes): every switch of the Public API
is one `--config.model...` override that builds alone; all of them train and evaluate (through
`train_and_evaluate` and the evaluator eval.py runs) in two runs that combine them, so that the
suite compiles two models instead of ten (train.py runs `train_and_evaluate`, eval.py the same
evaluator; their command lines are tested in test_cli.py and tests/evaluation/test_eval_cli.py)."""
import json
import math
import os

import pytest
from ml_collections import config_flags

from maskrcnn_jax.evaluation import evaluator
from maskrcnn_jax.modeling.builder import build_model
from maskrcnn_jax.training import trainer
from tests.training import common

SWITCHES = [  # (override, what the built model shows)
    ("box_pooler.type=pool", lambda m: m.box_pooler.type == "pool"),
    ("mask_pooler.type=warp", lambda m: m.head("mask_head").pooler.type == "warp"),
    ("mask_pooler.type=pool", lambda m: m.head("mask_head").pooler.type == "pool"),
    ("mask_pooler.reduce=max", lambda m: m.head("mask_head").pooler.reduce == "max"),
    ("box_pooler.reduce=max", lambda m: m.box_pooler.reduce == "max"),
    ("box_pooler.sampling_ratio=0", lambda m: m.box_pooler.sampling_ratio == 0),
    ("mask_head.type=mlp", lambda m: type(m.head("mask_head")).__name__ != "MaskHead"),
    ("mask_head.class_agnostic=True", lambda m: m.head("mask_head").class_agnostic),
    ("mask_head.loss=softmax", lambda m: m.head("mask_head").loss_type == "softmax"),
    ("backbone.type=resnet_c4", lambda m: m.levels == (4,) and m.roi_trunk is not None),
    ("mask_iou_head.type=standard", lambda m: m.head("mask_iou_head") is not None),
]


def _parsed(overrides):
  """configs/tiny.py with `--config.model.<override>` flags parsed as train.py parses them."""
  from absl import flags
  argv = (["prog", "--config", os.path.join(common.REPO, "configs", "tiny.py")]
          + [f"--config.model.{o}" for o in overrides])
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


@pytest.mark.parametrize("override,check", SWITCHES, ids=[s for s, _ in SWITCHES])
def test_each_switch_is_one_override(override, check):
  assert check(build_model(_parsed([override]).model))


def test_a_combination_that_cannot_work_is_one_clear_error():
  with pytest.raises(ValueError, match="pool") as e:
    build_model(_parsed(["box_pooler.type=pool", "box_pooler.reduce=ave"]).model)
  assert len(str(e.value).splitlines()) == 1


COMBINED = {  # every switch above, in two models
    "c4": ["backbone.type=resnet_c4", "box_pooler.type=pool", "mask_pooler.type=warp",
           "mask_pooler.reduce=max", "mask_head.loss=softmax", "mask_iou_head.type=standard"],
    "fpn": ["box_pooler.sampling_ratio=0", "box_pooler.reduce=max", "mask_pooler.type=pool",
            "mask_head.type=mlp", "mask_head.class_agnostic=True"],
}


def test_combined_covers_every_switch():
  assert {s for s, _ in SWITCHES} <= set(COMBINED["c4"]) | set(COMBINED["fpn"])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COMBINED))
def test_switches_train_and_evaluate(name, shapes_cache, tmp_path):
  parsed = _parsed(COMBINED[name])
  config = common.make_config(shapes_cache, {"training.steps": 2, "training.checkpoint_every": 2,
                                             "training.log_every": 1, "training.eval_every": 2})
  config.unlock()
  config.model = parsed.model
  metrics = []
  state = trainer.train_and_evaluate(
      config, str(tmp_path), hooks=[lambda step, state, m, batch: metrics.append(m)],
      evaluate=evaluator.make_training_evaluator(config, max_images=2, num_pictures=0))
  assert int(state.step) == 2
  expected = {"loss_objectness", "loss_classifier", "loss_box_reg", "loss_mask"} | (
      {"loss_maskiou"} if name == "c4" else set())
  assert expected <= set(metrics[-1])
  assert all(math.isfinite(float(metrics[-1][k])) for k in expected)
  with open(os.path.join(str(tmp_path), "eval", "step_2", "metrics.json")) as f:
    summary = json.load(f)
  assert {"bbox", "segm"} <= set(summary)
  assert all(math.isfinite(summary[t]["AP"]) for t in ("bbox", "segm"))

