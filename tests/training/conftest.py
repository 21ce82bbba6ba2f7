"""Training tests: a shapes dataset generated once per session, and a persistent jax compilation
cache (in .pytest_cache) shared by this process and the subprocesses, so each distinct program
compiles once."""
import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(request):
  path = str(request.config.cache.mkdir("jax_compilation_cache"))
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  import jax
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return path


@pytest.fixture(scope="session")
def shapes_cache(tmp_path_factory):
  """The folder of the tests' shapes dataset (generated and prepared once)."""
  from maskrcnn_jax.training import data_source
  from tests.training.common import make_config
  cache = str(tmp_path_factory.mktemp("shapes_cache") / "shapes")
  data_source.prepare_builder(make_config(cache).data)
  return cache

