"""mmpersona demo app (minimal page until the app issue): the model registry and an end-to-end run.

    python gradio_app.py --preset tiny [--host 127.0.0.1] [--port 7860]

Built only on the public API. Requires the `app` extra: pip install "mmpersona[app]".
"""

from __future__ import annotations

import argparse
import tempfile


def build_app(preset: str = "tiny", device: str = "auto"):
    """Build the Gradio Blocks; importing gradio happens here, with an install hint if it is missing."""
    try:
        import gradio as gr
    except ImportError as e:
        from mmpersona import MissingDependencyError

        raise MissingDependencyError('The app needs Gradio: pip install "mmpersona[app]"') from e
    from mmpersona.demo import run_demo
    from mmpersona.models import ROLES, model_status, resolve

    def registry_rows():
        rows = []
        for role in ROLES:
            st = model_status(resolve(role, preset=preset))
            rows.append([role, st.id, st.source, "yes" if st.available else "no"])
        return rows

    def run(progress=gr.Progress()):
        progress(0, desc="loading models and running each role once")
        report = run_demo(preset=preset, out_dir=tempfile.mkdtemp(prefix="mmpersona-app-"), device=device)
        return report.image_path, report.to_dict(), registry_rows()

    with gr.Blocks(title="mmpersona") as demo:
        gr.Markdown(f"# mmpersona\nPreset **{preset}**. Single-user demo page; the full app comes later.")
        table = gr.Dataframe(registry_rows(), headers=["role", "model", "source", "available"], label="Models")
        button = gr.Button("Run every model once", variant="primary")
        image = gr.Image(label="Generated image", type="filepath")
        report = gr.JSON(label="Report")
        button.click(run, outputs=[image, report, table], api_name="run_demo")
    return demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "default"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args()
    build_app(args.preset, args.device).queue().launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
