import copy
import math
import warnings

import numpy as np
import pytest
import torch

from posthoc_tune import TemperatureScaler, WeightAverager, apply_transform, combine
from posthoc_tune.datasets import load
from tests import reference as ref


@pytest.fixture(scope="module")
def trained_logits() -> tuple[np.ndarray, np.ndarray]:
    """Val logits of an MLP overfit to noisy digits (over-confident: optimal T > 1)."""
    torch.manual_seed(0)
    data = load("digits", noise=0.4)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(data.x_train), data.y_train).backward()
        opt.step()
    with torch.no_grad():
        return model(data.x_val).numpy(), data.y_val.numpy()


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
@pytest.mark.parametrize("n_classes", [10, 100])
def test_temperature_matches_grid_search_on_synthetic_logits(true_t: float, n_classes: int) -> None:
    rng = np.random.default_rng(n_classes)
    z = rng.normal(scale=3.0, size=(2000, n_classes))
    y = ref.sample_labels(z, true_t, rng)
    scaler = TemperatureScaler().fit(z.astype(np.float32), y)
    assert scaler.converged_ and not scaler.fallback_
    assert scaler.temperature_ == pytest.approx(ref.grid_temperature(z, y), rel=0.01)
    assert scaler.temperature_ == pytest.approx(true_t, rel=0.1)  # the data's true temperature


def test_temperature_matches_grid_search_on_trained_model_logits(
    trained_logits: tuple[np.ndarray, np.ndarray],
) -> None:
    z, y = trained_logits
    scaler = TemperatureScaler().fit(z, y)
    t_grid = ref.grid_temperature(z, y)
    assert t_grid > 1.5  # the overfit model is over-confident, so this is a real calibration
    assert scaler.temperature_ == pytest.approx(t_grid, rel=0.01)
    assert ref.nll(scaler.transform(z), y) <= ref.nll(z, y)


def test_warm_start_reaches_the_same_temperature_in_fewer_iterations() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(scale=3.0, size=(2000, 10))
    y = ref.sample_labels(z, 3.0, rng)
    cold = TemperatureScaler().fit(z, y)
    warm = TemperatureScaler(warm_start=True).fit(z, y)
    warm.fit(z * 1.01, y)  # next "epoch": nearly the same logits
    assert warm.n_iter_ < cold.n_iter_
    assert warm.temperature_ == pytest.approx(ref.grid_temperature(z * 1.01, y), rel=0.01)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_logits_fall_back_to_t_equals_one(bad: float) -> None:
    z = np.zeros((10, 3))
    z[4, 2] = bad
    with pytest.warns(RuntimeWarning, match="fell back to T=1: logits contain NaN or inf"):
        scaler = TemperatureScaler().fit(z, np.zeros(10, dtype=int))
    assert scaler.temperature_ == 1.0 and scaler.fallback_ and not scaler.converged_


def test_separable_data_give_a_finite_temperature_near_the_infimum() -> None:
    # Every row is right: NLL -> 0 as T -> 0, so there is no minimiser; the fit must stop at a
    # finite T where the remaining NLL is negligible, not diverge or return NaN.
    z = np.array([[5.0, 0.0], [0.0, 5.0]] * 10)
    y = np.array([0, 1] * 10)
    scaler = TemperatureScaler().fit(z, y)
    assert scaler.converged_ and 0.01 <= scaler.temperature_ < 1.0
    assert ref.nll(scaler.transform(z), y) < 1e-5 < ref.nll(z, y)


def test_scaler_argument_and_state_errors() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        TemperatureScaler().transform(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="bounds"):
        TemperatureScaler(bounds=(2.0, 3.0))
    with pytest.raises(ValueError, match="max_iter"):
        TemperatureScaler(max_iter=0)
    with pytest.raises(ValueError, match="empty"):
        TemperatureScaler().fit(np.zeros((0, 3)), np.zeros(0, dtype=int))


def test_transform_keeps_the_array_type() -> None:
    scaler = TemperatureScaler()
    scaler.temperature_ = 2.0
    assert isinstance(scaler.transform(torch.ones(2, 2)), torch.Tensor)
    np.testing.assert_array_equal(scaler.transform(np.full((2, 2), 3.0)), np.full((2, 2), 1.5))


def test_combine_by_logits_and_by_probabilities() -> None:
    a = np.array([[0.0, 2.0, 1.0]])
    b = np.array([[4.0, 0.0, -1.0]])
    np.testing.assert_allclose(combine([a, b]), [[2.0, 1.0, 0.0]])
    expected = np.log((ref.softmax(a) + ref.softmax(b)) / 2)
    np.testing.assert_allclose(combine([a, b], how="probs"), expected, rtol=1e-12)
    got = combine([torch.tensor(a), torch.tensor(b)], how="probs")
    assert isinstance(got, torch.Tensor)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


def test_combine_rejects_bad_members() -> None:
    with pytest.raises(ValueError, match=r"share one .* shape, got \[\(2, 3\), \(2, 4\)\]"):
        combine([np.zeros((2, 3)), np.zeros((2, 4))])
    with pytest.raises(ValueError, match="at least one member"):
        combine([])
    with pytest.raises(ValueError, match="unknown combiner 'median'"):
        combine([np.zeros((2, 3))], how="median")  # type: ignore[arg-type]


def _members(seed: int, n: int = 3) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.normal(scale=2.0, size=(1500, 10))
    y = ref.sample_labels(base, 1.0, rng)
    val = [(base + rng.normal(size=base.shape)) * s for s in (2.0, 3.0, 1.5)[:n]]
    test = [v + rng.normal(scale=0.1, size=v.shape) for v in val]
    return val, test, y


@pytest.mark.parametrize("how", ["logits", "probs"])
def test_ensemble_transforms_equal_the_brute_force_pipeline(how: str) -> None:
    val, test, y = _members(0)
    t_members = [ref.grid_temperature(v, y) for v in val]

    def manual(parts: list[np.ndarray]) -> np.ndarray:
        scaled = [p / t for p, t in zip(parts, t_members, strict=True)]
        if how == "logits":
            return np.mean(scaled, axis=0)
        return np.log(np.mean([ref.softmax(s) for s in scaled], axis=0))

    ens_val, ens_test = manual(val), manual(test)
    got_val, got_test = apply_transform("swa+ens", val, y, test, ensemble=how)  # type: ignore[arg-type]
    np.testing.assert_allclose(got_val, ens_val, rtol=0.02, atol=1e-3)
    assert got_test is not None
    assert ref.nll(got_test, y) == pytest.approx(ref.nll(ens_test, y), rel=1e-3)

    t_ens = ref.grid_temperature(ens_val, y)
    got_val, got_test = apply_transform("ens+ts", val, y, test, ensemble=how)  # type: ignore[arg-type]
    assert ref.nll(got_val, y) == pytest.approx(ref.nll(ens_val / t_ens, y), rel=1e-4)
    assert got_test is not None
    assert ref.nll(got_test, y) == pytest.approx(ref.nll(ens_test / t_ens, y), rel=1e-3)


def test_given_member_temperatures_replace_the_member_fits() -> None:
    val, test, y = _members(3)
    given = [0.5, 2.0, None]  # the last member is fit here
    got_val, got_test = apply_transform("ens", val, y, test, member_temperatures=given)
    t_last = ref.grid_temperature(val[2], y)
    assert got_test is not None
    for got, parts in ((got_val, val), (got_test, test)):
        expected = np.mean([parts[0] / 0.5, parts[1] / 2.0, parts[2] / t_last], axis=0)
        np.testing.assert_allclose(got, expected, rtol=0.02, atol=1e-3)
    with pytest.raises(ValueError, match="got 2 member temperatures for 3 members"):
        apply_transform("ens", val, y, member_temperatures=[1.0, 1.0])
    with pytest.raises(ValueError, match="member temperature must be finite and > 0, got -1"):
        apply_transform("ens", val, y, member_temperatures=[1.0, 1.0, -1.0])


def test_single_model_transforms() -> None:
    val, test, y = _members(1, n=1)
    got_val, got_test = apply_transform("base", val, y, test)
    np.testing.assert_allclose(got_val, val[0], rtol=1e-6)
    got_val, got_test = apply_transform("swa+ts", val, y, test)
    t = ref.grid_temperature(val[0], y)
    assert got_test is not None
    np.testing.assert_allclose(got_test, test[0] / t, rtol=0.01)
    with pytest.raises(ValueError, match="'ts' takes exactly one member, got 3"):
        apply_transform("ts", *_members(2)[::2])
    with pytest.raises(ValueError, match=r"unknown transform 'ens\+swa'"):
        apply_transform("ens+swa", val, y)


def _step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float = 0.1) -> None:
    model.train()
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        for p in model.parameters():
            assert p.grad is not None
            p.sub_(lr * p.grad)


def _tiny_model(batchnorm: bool = False) -> torch.nn.Sequential:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Linear(4, 8)]
    if batchnorm:
        layers.append(torch.nn.BatchNorm1d(8))
    layers += [torch.nn.ReLU(), torch.nn.Linear(8, 3)]
    return torch.nn.Sequential(*layers)


@pytest.mark.parametrize("start_epoch", [1, 3])
def test_swa_is_the_mean_of_recorded_end_of_epoch_weights(start_epoch: int) -> None:
    model = _tiny_model()
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    swa = WeightAverager(model, start_epoch=start_epoch)
    recorded = []
    for epoch in range(1, 7):
        _step(model, x, y)
        swa.update(model)
        recorded.append({k: v.clone() for k, v in model.state_dict().items()})
        assert swa.active == (epoch >= start_epoch)
    averaged = swa.model.state_dict()
    for name in averaged:
        expected = torch.stack([r[name] for r in recorded[start_epoch - 1 :]]).mean(dim=0)
        torch.testing.assert_close(averaged[name], expected, rtol=1e-6, atol=1e-7)
    assert swa.n_averaged == 7 - start_epoch


def test_swa_batchnorm_statistics_are_re_estimated_on_the_given_inputs() -> None:
    model = _tiny_model(batchnorm=True)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    x_val = torch.randn(50, 4) * 3 + 1
    swa = WeightAverager(model)
    for _ in range(3):
        _step(model, x, y)
        swa.update(model)
    swa.update_bn([x_val])
    averaged = swa.model
    assert isinstance(averaged, torch.nn.Sequential)
    linear, bn = averaged[0], averaged[1]
    with torch.no_grad():
        h = linear(x_val)
    torch.testing.assert_close(bn.running_mean, h.mean(dim=0))
    torch.testing.assert_close(bn.running_var, h.var(dim=0, unbiased=True))
    assert swa.has_batchnorm


def test_swa_state_dict_continues_the_average_exactly() -> None:
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    model_a = _tiny_model()
    swa_a = WeightAverager(model_a)
    for _ in range(3):
        _step(model_a, x, y)
        swa_a.update(model_a)
    # state_dict() returns live references (torch convention): copy as a checkpoint would.
    state = copy.deepcopy(swa_a.state_dict())
    weights = copy.deepcopy(model_a.state_dict())
    for _ in range(2):
        _step(model_a, x, y)
        swa_a.update(model_a)

    model_b = _tiny_model()
    model_b.load_state_dict(weights)
    swa_b = WeightAverager(model_b)
    swa_b.load_state_dict(state)
    for _ in range(2):
        _step(model_b, x, y)
        swa_b.update(model_b)
    assert swa_b.epoch == 5 and swa_b.n_averaged == 5
    for (k, a), b in zip(
        swa_a.model.state_dict().items(), swa_b.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    with pytest.raises(ValueError, match="start_epoch=1"):
        WeightAverager(model_b, start_epoch=2).load_state_dict(state)


def test_weight_averager_validates_start_epoch() -> None:
    with pytest.raises(ValueError, match="start_epoch must be an int >= 1, got 0"):
        WeightAverager(_tiny_model(), start_epoch=0)


def test_no_warning_on_a_normal_fit() -> None:
    rng = np.random.default_rng(5)
    z = rng.normal(size=(300, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TemperatureScaler().fit(z, ref.sample_labels(z, 1.0, rng))
