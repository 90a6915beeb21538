import pilot_hf


def test_public_api_is_importable():
    for name in pilot_hf.__all__:
        assert getattr(pilot_hf, name) is not None
