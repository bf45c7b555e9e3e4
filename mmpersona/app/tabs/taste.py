"""The Taste tab: the onboarding, pairs of generated images to choose between."""

import html

from ..config import TRAIN_EVERY
from ..render import cards_html, image_uri_bytes
from ..state import App


def taste_tab(gr, app: App, guarded, demo, profile_tick) -> None:
    """Onboarding: the app shows pairs of images it generates, the user picks A or B (or skips), with an optional
    comment; each choice is a pair event; the reward model trains in the background every few choices."""
    pair = gr.State(None)
    # the id of the pair the page shows, sent back with a click: a click answers the pair its user saw
    pair_id = gr.Textbox(visible=False, elem_id="taste-pair-id")
    gr.Markdown("Pick the image you like better in each pair. Every choice goes into your profile; after every "
                f"{TRAIN_EVERY} choices your personal reward model trains in the background.")
    t_order = gr.Radio([("Most informative first", "active"), ("Fixed order", "random")], value="active",
                       label="Which pairs", elem_id="taste-order",
                       info="Most informative: the pair whose answer teaches your profile the most, from a shared "
                            "set of images of the built-in prompts (made once, in the background, on first use: "
                            "the fixed order answers until it is ready). Your own prompts always go in the fixed "
                            "order.")
    t_prompts = gr.Textbox(label="Your own prompts (optional, one per line)", lines=2, elem_id="taste-prompts")
    start_btn = gr.Button("Show me a pair", variant="primary", elem_id="taste-start")
    t_prompt = gr.Markdown(elem_id="taste-prompt")
    with gr.Row():
        t_a = gr.HTML(label="A", elem_id="taste-a")
        t_b = gr.HTML(label="B", elem_id="taste-b")
    t_comment = gr.Textbox(label="Why (optional)", placeholder="warmer light, less clutter", elem_id="taste-comment")
    with gr.Row():
        a_btn = gr.Button("A is better", elem_id="taste-choose-a")
        b_btn = gr.Button("B is better", elem_id="taste-choose-b")
        skip_btn = gr.Button("Skip", elem_id="taste-skip")
    t_status = gr.Textbox(label="Status", interactive=False, elem_id="taste-status")
    t_progress = gr.HTML(elem_id="taste-progress")
    t_reward = gr.Markdown(elem_id="taste-reward")
    timer = gr.Timer(1.5, active=False)

    def show(p):
        return (p.get("id", ""), f"**{html.escape(p['prompt'])}**", cards_html([(image_uri_bytes(p["images"][0]), "A")], empty=""),
                cards_html([(image_uri_bytes(p["images"][1]), "B")], empty=""))

    @guarded
    def next_pair(prompts, current, order, request: gr.Request, progress=gr.Progress()):
        user = app.user(request)
        progress(0, desc="generating a pair")
        step = (current or {}).get("step", len(app.profile(user).events("pair")) - 1) + 1
        p = app.taste_pair(user, prompts, step, order)
        return (p, *show(p), app.taste_progress(user), "")

    def choose(which, prompts, current, seen, comment, count, order, request, progress):
        user = app.user(request)
        msg = app.taste_choose(user, current, which, comment, shown=seen or None)
        training = app.training_status(user).startswith("training")
        progress(0, desc="generating the next pair")
        p = app.taste_pair(user, prompts, current["step"] + 1, order)
        return (p, *show(p), app.taste_progress(user), msg, "", count + 1, app.training_status(user),
                gr.Timer(active=training))

    @guarded
    def choose_a(prompts, current, seen, comment, count, order, request: gr.Request, progress=gr.Progress()):
        return choose("A", prompts, current, seen, comment, count, order, request, progress)

    @guarded
    def choose_b(prompts, current, seen, comment, count, order, request: gr.Request, progress=gr.Progress()):
        return choose("B", prompts, current, seen, comment, count, order, request, progress)

    @guarded
    def skip(prompts, current, seen, order, request: gr.Request, progress=gr.Progress()):
        user = app.user(request)
        app.answer_pair(user, current, seen or None)  # a skip answers the pair too: once
        progress(0, desc="generating the next pair")
        p = app.taste_pair(user, prompts, current["step"] + 1, order)
        return (p, *show(p), app.taste_progress(user), "skipped")

    @guarded
    def poll(request: gr.Request):
        text = app.training_status(app.user(request))
        return text, gr.Timer(active=text.startswith("training"))

    @guarded
    def load(request: gr.Request):
        user = app.user(request)
        return app.taste_progress(user), app.training_status(user)

    shown = [pair, pair_id, t_prompt, t_a, t_b, t_progress]
    t2i = {"concurrency_id": "t2i", "concurrency_limit": 1}  # each makes the next pair: the generation queue
    start_btn.click(next_pair, [t_prompts, pair, t_order], [*shown, t_status], api_name="taste_pair", **t2i)
    chosen = [*shown, t_status, t_comment, profile_tick, t_reward, timer]
    a_btn.click(choose_a, [t_prompts, pair, pair_id, t_comment, profile_tick, t_order], chosen, api_name="taste_choose_a",
                **t2i)
    b_btn.click(choose_b, [t_prompts, pair, pair_id, t_comment, profile_tick, t_order], chosen, api_name="taste_choose_b",
                **t2i)
    skip_btn.click(skip, [t_prompts, pair, pair_id, t_order], [*shown, t_status], api_name="taste_skip", **t2i)
    timer.tick(poll, None, [t_reward, timer], api_visibility="private")
    demo.load(load, None, [t_progress, t_reward], api_visibility="private")
