import pytest

gr = pytest.importorskip("gradio", reason="the app extra is not installed")


def test_minimal_app_builds_and_runs(tiny_cache):
    import gradio_app

    demo = gradio_app.build_app(preset="tiny", device="cpu")
    assert isinstance(demo, gr.Blocks)
    names = {dep.get("api_name") for dep in demo.config["dependencies"]}
    assert "run_demo" in names
