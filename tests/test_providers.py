from pathlib import Path

import pytest

from batchops.errors import ConfigError
from batchops.providers import Key, Pool, load_keys
from batchops.spec import JobSpec, ModelEntry


def spec(*models: str, **kw) -> JobSpec:
    return JobSpec(source="x.csv", prompt="{a}", models=[ModelEntry(name=m, **kw) for m in models])


def test_key_pool_order_and_dedup(tmp_path: Path):
    f = tmp_path / "keys.txt"
    f.write_text("# comment\nsk-file-1111111111\n\nsk-env-2222222222\n")
    keys = load_keys(
        f, env={"OPENAI_API_KEYS": "sk-env-2222222222, sk-env-3333333333", "OPENAI_API_KEY": "sk-x"}
    )
    assert [k.label for k in keys] == ["sk-…2222", "sk-…3333", "sk-…1111"]


def test_single_key_fallback():
    assert [k.value for k in load_keys(None, env={"OPENAI_API_KEY": "sk-one-000000000"})] == [
        "sk-one-000000000"
    ]


def test_key_repr_hides_value():
    k = Key("sk-secret-abcdefghijkl")
    assert "secret" not in repr(k) and "secret" not in str(k) and "secret" not in k.key_id


def test_failover_order_models_then_keys():
    pool = Pool(spec("m1", "m2"), [Key("sk-a-000000001"), Key("sk-b-000000002")], env={})
    order = [(m.name, k.label) for m, k in pool.pairs]
    assert order == [("m1", "sk-…0001"), ("m2", "sk-…0001"), ("m1", "sk-…0002"), ("m2", "sk-…0002")]
    a = pool.pairs[0][1].key_id
    pool.exhaust("m1", a, "quota")
    assert pool.current()[0].name == "m2"
    pool.exhaust("m2", a, "quota")
    assert pool.current()[1].label == "sk-…0002" and pool.current()[0].name == "m1"
    pool.exhaust("m1", None, "model gone everywhere")
    assert pool.current()[0].name == "m2"
    pool.exhaust("m2", pool.current()[1].key_id, "quota", whole_key=True)
    assert pool.current() is None


def test_entry_key_env_missing_is_config_error():
    with pytest.raises(ConfigError, match="LOCAL_KEY"):
        Pool(spec("m1", api_key_env="LOCAL_KEY"), [], env={})


def test_no_key_at_all_is_config_error():
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        Pool(spec("m1"), [], env={})


def test_scrub():
    pool = Pool(spec("m1"), [Key("sk-live-abcdefghijklmnop")], env={})
    assert pool.scrub("bad key sk-live-abcdefghijklmnop here") == "bad key sk-…mnop here"


def test_key_cycle_starts_again_from_the_first_key_once_but_not_for_a_bad_key():
    s = spec("m1").model_copy(update={"key_cycle": True})
    pool = Pool(s, [Key("sk-a-000000001"), Key("sk-b-000000002"), Key("sk-c-000000003")], env={})
    a, b, c = (k.key_id for _, k in pool.pairs)
    pool.exhaust("m1", a, "quota")
    pool.exhaust("m1", b, "invalid key", whole_key=True)
    pool.exhaust("m1", c, "quota")
    assert pool.current()[1].key_id == a  # back to the first key; the bad key stays out
    pool.exhaust("m1", a, "quota again")
    assert pool.current()[1].key_id == c
    pool.exhaust("m1", c, "quota again")
    assert pool.current() is None  # once per invocation
