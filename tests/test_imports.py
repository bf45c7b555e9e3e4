import subprocess
import sys

HEAVY = ["torch", "numpy", "transformers", "diffusers", "open_clip", "PIL", "psycopg", "typer", "fastapi", "uvicorn",
         "gradio"]


def test_import_is_light():
    code = (
        "import sys, mmpersona, concept_db, pipelines, mmpersona.models, mmpersona.images, mmpersona.server, "
        "mmpersona.app\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"heavy modules imported eagerly: {out.stdout.strip()}"


def test_public_api_resolves_lazily():
    import mmpersona

    assert mmpersona.load_image is mmpersona.images.load_image
    assert issubclass(mmpersona.ImageLoadError, mmpersona.MmpersonaError)
    assert set(mmpersona.__all__) >= {"ClipEmbedder", "load_embedder", "load_vlm", "load_t2i", "ModelSpec"}
    import pytest

    with pytest.raises(AttributeError, match="no_such_name"):
        _ = mmpersona.no_such_name
