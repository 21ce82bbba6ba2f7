"""`ops.indexing.take_one_hot` equals `jnp.take_along_axis` (values and gradients) and its
gradient holds no scatter."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskrcnn_jax.ops.indexing import take_one_hot


@pytest.mark.parametrize("shape,axis,index_shape", [
    ((50, 91), -1, (50,)), ((20, 91, 4), 1, (20, 1)), ((6, 17, 3136), -1, (6, 17)),
    ((8, 28, 28, 5), 3, (8, 1, 1))])
def test_equals_take_along_axis_value_and_gradient(shape, axis, index_shape):
  rng = np.random.default_rng(len(shape))
  x = rng.normal(size=shape).astype(np.float32)
  x.flat[::7] = -np.inf if len(shape) == 2 else x.flat[::7]  # log-probabilities may be -inf
  k = shape[axis]
  index = rng.integers(0, k, index_shape).astype(np.int32)
  full = np.broadcast_to(np.expand_dims(index, axis % x.ndim),
                         tuple(1 if i == axis % x.ndim else s for i, s in enumerate(shape)))

  def ref(x):
    return jnp.squeeze(jnp.take_along_axis(x, jnp.asarray(full), axis=axis), axis)
  np.testing.assert_array_equal(np.asarray(take_one_hot(x, index, axis)), np.asarray(ref(x)))
  finite = np.where(np.isfinite(x), x, 0.0)
  w = rng.normal(size=np.asarray(ref(finite)).shape).astype(np.float32)
  g = jax.grad(lambda x: jnp.sum(take_one_hot(x, index, axis) * w))(finite)
  g_ref = jax.grad(lambda x: jnp.sum(ref(x) * w))(finite)
  np.testing.assert_array_equal(np.asarray(g), np.asarray(g_ref))


def test_gradient_has_no_scatter():
  x = jnp.ones((64, 91, 4))
  index = jnp.zeros((64, 1), jnp.int32)
  for platform in ("tpu", "cuda", "cpu"):
    text = jax.jit(jax.grad(lambda x: jnp.sum(take_one_hot(x, index, 1)))).trace(x).lower(
        lowering_platforms=(platform,)).as_text()
    assert "scatter" not in text and "gather" not in text
