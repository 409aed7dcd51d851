"""The transform framework: registry, typed configs, ordering, dumps."""

import pytest

from autodeploy import export_model
from autodeploy.models import build_model
from autodeploy.transforms import TRANSFORMS, Transform, TransformInfo, run_pipeline
from autodeploy.transforms.pipeline import check_order


@pytest.fixture(scope="module")
def gm():
    return export_model(build_model("llama"), max_seq_len=64, route_attention=False)


def test_unknown_transform_lists_known_ones(gm):
    with pytest.raises(ValueError, match=r"unknown transform\(s\) \['match_atention'\].*match_attention"):
        run_pipeline(gm, ["match_atention"])


def test_unknown_option_lists_known_ones(gm):
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['probe_len'\].*probe_length"):
        run_pipeline(gm, ["match_attention"], {"match_attention": {"probe_len": 8}})


def test_config_for_a_transform_not_in_the_pipeline(gm):
    with pytest.raises(ValueError, match="not in the pipeline"):
        run_pipeline(gm, [], {"match_attention": {}})


def test_requires_is_checked(monkeypatch):
    class Needy(Transform):
        name = "needy"
        requires = ("match_attention",)

        def apply(self, gm, info):
            pass

    monkeypatch.setitem(TRANSFORMS, "needy", Needy)
    check_order(["match_attention", "needy"])
    with pytest.raises(ValueError, match="requires 'match_attention' to run before it"):
        check_order(["needy", "match_attention"])
    with pytest.raises(ValueError, match="not in the pipeline"):
        check_order(["needy"])


def test_disabled_transform_is_skipped_and_dump_written(tmp_path):
    gm = export_model(build_model("llama"), max_seq_len=64, route_attention=False)
    (info,) = run_pipeline(gm, ["match_attention"], {"match_attention": {"enabled": False}}, dump_dir=tmp_path)
    assert info.skipped and info.num_matches == 0
    (info,) = run_pipeline(gm, ["match_attention"], dump_dir=tmp_path)
    assert info.num_matches == 2 and isinstance(info, TransformInfo)
    dumped = (tmp_path / "00_match_attention.txt").read_text()
    assert "autodeploy.attention" in dumped
    assert "[match_attention] 2 matches" in info.summary()


def test_rewrites_slower_on_a_gpu_are_off_there_unless_asked_for():
    from autodeploy.transforms.pipeline import OFF_BY_DEFAULT_ON_CUDA, cached_pipeline

    assert OFF_BY_DEFAULT_ON_CUDA <= set(cached_pipeline())  # on the CPU: on
    assert not OFF_BY_DEFAULT_ON_CUDA & set(cached_pipeline(device="cuda"))
    assert "fuse_mamba_decode" in cached_pipeline({"fuse_mamba_decode": True}, device="cuda:0")
    assert {"match_linear", "fuse_norm_rope", "fuse_norm_add_norm"} <= set(cached_pipeline(device="cuda"))
