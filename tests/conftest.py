import pytest

from latentforge.training.loop import TrainConfig, train_diffusion


@pytest.fixture(scope="session")
def tiny_digits_model(tmp_path_factory):
    """A 2-step class-conditional digits model: right format, useless weights, made in ~1 s."""
    out = tmp_path_factory.mktemp("tiny-digits")
    cfg = TrainConfig(
        data="digits", out=str(out), cond="class", max_steps=2, batch_size=4,
        sample_every=0, quiet=True,
    )  # fmt: skip
    assert train_diffusion(cfg) == 0
    return out
