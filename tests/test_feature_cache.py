"""Cached trunk features (data.feature_cache): the packed token index, training from the cache against training
through the frozen layers, reuse and refusal of a cache, the settings it cannot serve."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrl_lm
from jaxrl_lm import data, envs
from jaxrl_lm.config import ConfigError, load_config
from jaxrl_lm.data.loader import TOKEN_INDEX
from jaxrl_lm.models.partition import Partition
from jaxrl_lm.train import features, loop
from jaxrl_lm.train.update import loss_fn

SMALL = dict(model__d_model=32, model__n_layers=3, model__n_heads=4, data__task_episodes=120, data__batch_size=8,
             data__seq_len=64, optim__schedule="constant", train__checkpoint_every=0, train__frozen_layers=2)


def small_cfg(**kw):
    return load_config("configs/demo.yaml", **{**SMALL, **kw})


def indexed_loader(cfg):
    return data.make_loader(cfg.data, tokenizer=data.load_tokenizer(cfg.data.tokenizer),
                            episodes=envs.task_dataset(cfg.data), token_index=True)


def test_the_token_index_of_a_packed_batch_points_at_its_own_tokens():
    cfg = small_cfg()
    loader = indexed_loader(cfg)
    source = loader.source
    flat = np.concatenate([np.asarray(source.source[i]["tokens"]) for i in range(len(source))])
    for _ in range(3):
        batch = next(loader)
        index = batch[TOKEN_INDEX]
        chex.assert_shape(index, batch["tokens"].shape)
        assert index.dtype == np.int32
        real = batch["segment_ids"] != 0
        assert np.all((index > 0) == real)
        np.testing.assert_array_equal(flat[index[real] - 1], batch["tokens"][real])
    loader.close()


@pytest.mark.slow
@pytest.mark.parametrize("frozen", [2, -1])
def test_the_loss_and_gradient_from_the_cache_equal_those_through_the_frozen_layers(tmp_path, frozen):
    cfg = small_cfg(train__frozen_layers=frozen, data__feature_cache=str(tmp_path / "cache"))
    params = jaxrl_lm.split_model(jaxrl_lm.build_model(cfg.model, seed=3))[1]
    loader = indexed_loader(cfg)
    store = features.open_or_build(cfg, params, loader.source, None, progress=False)
    assert store.meta["shape"] == [int(loader.source.offsets[-1]), cfg.model.d_model]
    cached = features.FeatureBatches(loader, store)
    batch = {k: jnp.asarray(v) for k, v in next(cached).items()}
    chex.assert_shape(batch["features"], (*batch["tokens"].shape, cfg.model.d_model))
    plain = {k: v for k, v in batch.items() if k != "features"}
    part = Partition.of(cfg)
    trained, bottom = part.split(params)
    graphdef = jaxrl_lm.split_model(jaxrl_lm.build_model(cfg.model))[0]
    groups = jaxrl_lm.init_state(cfg, params).groups

    def loss_and_grad(b):
        return jax.value_and_grad(lambda t: loss_fn(cfg, graphdef, part.join(t, bottom), groups, b,
                                                    jnp.float32(100.0), None), has_aux=True)(trained)

    (loss_plain, _), grads_plain = loss_and_grad(plain)
    (loss_cached, _), grads_cached = loss_and_grad(batch)
    np.testing.assert_allclose(loss_cached, loss_plain, rtol=1e-5)
    chex.assert_trees_all_close(grads_cached, grads_plain, rtol=1e-5, atol=1e-6)
    cached.close()


def test_a_cached_run_trains_like_an_uncached_one_and_reuses_its_cache(tmp_path):
    episodes = envs.task_dataset(small_cfg().data)
    losses = {}
    for name, cache in (("plain", ""), ("cached", str(tmp_path / "cache")), ("again", str(tmp_path / "cache"))):
        cfg = small_cfg(train__steps=4, train__log_every=1, train__out_dir=str(tmp_path / name),
                        data__feature_cache=cache)
        loop.train(cfg, progress=False, episodes=episodes)
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [x["loss"] for x in lines if "loss" in x]
        if name == "cached":
            written = (tmp_path / "cache" / "features.bin").stat().st_mtime_ns
    assert len(losses["plain"]) == 4
    np.testing.assert_allclose(losses["cached"], losses["plain"], rtol=1e-4)
    assert losses["again"] == losses["cached"]
    assert (tmp_path / "cache" / "features.bin").stat().st_mtime_ns == written  # read back, not rebuilt

    # Other data, or another frozen bottom: the cache is refused, naming what differs.
    with pytest.raises(ConfigError, match="data.records"):
        loop.train(small_cfg(train__steps=1, train__out_dir=str(tmp_path / "x"), data__feature_cache=str(
            tmp_path / "cache"), data__task_episodes=60), progress=False,
            episodes=envs.task_dataset(small_cfg(data__task_episodes=60).data))
    with pytest.raises(ConfigError, match="frozen_params"):
        loop.train(small_cfg(train__steps=1, train__seed=5, train__out_dir=str(tmp_path / "y"),
                             data__feature_cache=str(tmp_path / "cache")), progress=False, episodes=episodes)


def test_bfloat16_features_are_the_float32_ones_rounded(tmp_path):
    cfg32 = small_cfg(data__feature_cache=str(tmp_path / "f32"))
    cfg16 = small_cfg(data__feature_cache=str(tmp_path / "bf16"), data__feature_dtype="bfloat16")
    params = jaxrl_lm.split_model(jaxrl_lm.build_model(cfg32.model, seed=0))[1]
    loader = indexed_loader(cfg32)
    s32 = features.open_or_build(cfg32, params, loader.source, None, progress=False)
    s16 = features.open_or_build(cfg16, params, loader.source, None, progress=False)
    index = next(loader)[TOKEN_INDEX]
    f32, f16 = s32.gather(index), s16.gather(index)
    assert f16.dtype == np.float32
    np.testing.assert_array_equal(f16, f32.astype(jnp.bfloat16).astype(np.float32))
    assert (tmp_path / "bf16" / "features.bin").stat().st_size * 2 == (tmp_path / "f32" / "features.bin").stat().st_size
    loader.close()


def test_settings_a_cache_cannot_serve_are_errors_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="train.frozen_layers"):
        small_cfg(train__frozen_layers=0, data__feature_cache=str(tmp_path))
    cfg = small_cfg(data__feature_cache=str(tmp_path), rl__objective="utterance_q")
    with pytest.raises(ConfigError, match="adds tokens"):
        features.check_supported(cfg, online=False, process_count=1)
    with pytest.raises(ConfigError, match="one process"):
        features.check_supported(small_cfg(data__feature_cache=str(tmp_path)), online=False, process_count=2)
