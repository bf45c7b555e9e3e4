"""The Generate tab: personalized images, with feedback under each."""

from ..config import MAX_IMAGES, STRATEGY_CHOICES
from ..render import cards_html, image_uri_bytes
from ..state import App


def generate_tab(gr, app: App, guarded, preset: str, profile_tick) -> None:
    """Personalized generation; under each image, like, dislike and "this one" (chosen over the others of the
    same prompt), stored in the profile at once."""
    generated = gr.State(None)
    g_prompt = gr.Textbox(label="Prompt", placeholder="a photo of <bo> on the beach", elem_id="generate-prompt")
    with gr.Row():
        g_strats = gr.CheckboxGroup(STRATEGY_CHOICES, value=["attributes", "ip_adapter", "rerank"], label="Strategies")
        g_n = gr.Slider(1, MAX_IMAGES, value=2, step=1, label="Images")
        g_steps = gr.Slider(1, 50, value=20 if preset == "default" else 4, step=1, label="Steps")
        g_seed = gr.Number(value=0, precision=0, label="Seed")
    g_compare = gr.Checkbox(value=False, label="Also generate without personalization (twice the time)")
    g_btn = gr.Button("Generate", variant="primary")
    g_status = gr.Textbox(label="Status", interactive=False, elem_id="generate-status")
    g_comment = gr.Textbox(label="Comment for your feedback (optional)", elem_id="feedback-comment")
    g_mine = gr.HTML(visible=False)  # the gradio_client API's view of the images (the page shows the slots)
    slots, buttons = [], []
    with gr.Row(elem_id="generated"):
        for i in range(MAX_IMAGES):
            with gr.Column(visible=False, min_width=200, elem_id=f"generated-{i + 1}") as col:
                shown = gr.HTML()
                with gr.Row():
                    like = gr.Button("Like", size="sm", elem_classes=["feedback-like"])
                    dislike = gr.Button("Dislike", size="sm", elem_classes=["feedback-dislike"])
                    choose = gr.Button("This one", size="sm", elem_classes=["feedback-choose"])
            slots.append((col, shown))
            buttons.append((like, dislike, choose))
    g_plain = gr.HTML(label="Vanilla", elem_id="vanilla")
    g_meta = gr.JSON(label="Metadata")

    @guarded
    def gen(prompt, strategies, n, steps, seed, compare, request: gr.Request, progress=gr.Progress()):
        progress(0, desc="generating")
        mine, plain, meta, state = app.generate(app.user(request), prompt, list(strategies or []), int(n), int(steps),
                                                int(seed), bool(compare))
        cells = []
        for i in range(MAX_IMAGES):
            if i < len(state["images"]):
                score = meta["personalized"][i]["reward_score"]
                cells += [gr.update(visible=True),
                          cards_html([(image_uri_bytes(state["images"][i]), f"image {i + 1} · score {score:.3f}")],
                                     empty="", size=240)]
            else:
                cells += [gr.update(visible=False), ""]
        return (mine, plain, meta, state, f"generated {len(state['images'])} image(s)", *cells)

    outputs = [g_mine, g_plain, g_meta, generated, g_status] + [x for pair in slots for x in pair]
    g_btn.click(gen, [g_prompt, g_strats, g_n, g_steps, g_seed, g_compare], outputs, api_name="generate",
                concurrency_id="t2i", concurrency_limit=1)  # the generation model's queue (see the chat tab)
    for i, trio in enumerate(buttons):
        for kind, button in zip(("like", "dislike", "choose"), trio, strict=True):

            @guarded
            def give(state, comment, count, request: gr.Request, kind=kind, i=i):
                return app.feedback(app.user(request), kind, state, i, comment), count + 1

            button.click(give, [generated, g_comment, profile_tick], [g_status, profile_tick],
                         api_name=f"{kind}_generated_{i + 1}")
