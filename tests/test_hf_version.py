"""The supported transformers range is enforced with an error naming it."""

import pytest

from autodeploy.hf_version import SUPPORTED, UnsupportedTransformersError, check_transformers_version


def test_installed_transformers_is_supported():
    import transformers

    assert check_transformers_version() == transformers.__version__


@pytest.mark.parametrize("version", ["5.17.0", "5.20.2", "5.24.0", "5.24.1.dev0"])
def test_inside_the_range(version):
    assert check_transformers_version(version) == version


@pytest.mark.parametrize("version", ["4.57.6", "5.16.1", "5.25.0", "6.0.0"])
def test_outside_the_range_names_it(version):
    with pytest.raises(UnsupportedTransformersError, match=f"transformers {version} is not supported.*"
                                                            f"transformers{SUPPORTED.replace('.', '[.]')}"):
        check_transformers_version(version)
