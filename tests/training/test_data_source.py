"""data_source: the shapes generation parameters name the cache, and a cache made with other
parameters is refused instead of silently reused."""
import json

import pytest

from maskrcnn_jax.training import data_source
from maskrcnn_jax.training.errors import ConfigError
from tests.training import common


def test_every_generation_parameter_names_the_cache():
  base = common.make_config("").data
  dirs = {data_source.shapes_cache_dir(base)}
  for key, value in (("min_visible_fraction", 0.1), ("seed", 7), ("num_val", 5)):
    d = common.make_config("").data
    d.shapes[key] = value
    dirs.add(data_source.shapes_cache_dir(d))
  assert len(dirs) == 4
  assert data_source.shapes_params(base)["min_visible_fraction"] == 0.5


def test_a_cache_made_with_other_parameters_is_refused(tmp_path):
  cache = str(tmp_path / "shapes")
  data = common.make_config(cache).data
  data.shapes.update(dict(num_train=2, num_val=2))
  data_source.prepare_builder(data)
  stored = json.load(open(tmp_path / "shapes" / "shapes.json"))
  assert stored == data_source.shapes_params(data)
  data.shapes.min_visible_fraction = 0.1
  with pytest.raises(ConfigError, match="holds shapes generated with"):
    data_source.prepare_builder(data)
