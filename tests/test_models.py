import numpy as np


def test_reference_cnn_has_the_reference_parameter_count() -> None:
    from fedgrpc.common.models import reference_cnn, weight_specs

    model = reference_cnn()
    assert model.count_params() == 167_562
    specs = weight_specs(model)
    assert len(specs) == 8 and all(s.dtype == "float32" for s in specs)
    assert len({s.name for s in specs}) == 8  # names identify tensors on the wire


def test_reset_optimizer_trains_exactly_like_a_fresh_one() -> None:
    import keras
    from fedgrpc.common.models import FreshOptimizer, reference_cnn

    rng = np.random.default_rng(0)
    x = rng.random((64, 32, 32, 3), dtype=np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 64)]
    keras.utils.set_random_seed(1)
    start = reference_cnn().get_weights()

    warm = reference_cnn()
    reset = FreshOptimizer(warm)
    warm.set_weights(start)
    warm.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)  # leaves Adam moments and a step count
    warm.set_weights(start)
    reset.reset()
    warm.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)

    fresh = reference_cnn()
    fresh.set_weights(start)
    fresh.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(warm.get_weights(), fresh.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
