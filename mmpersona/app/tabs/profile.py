"""The Profile tab: your likes, dislikes and choices, the attributes, your own images, the reward model."""

import html

from ..config import PROFILE_SHOWN
from ..render import grid_html
from ..state import App


def profile_tab(gr, app: App, guarded, demo, profile_tick) -> None:
    """The profile, visible: likes, dislikes and choices with thumbnails and comments, each removable; the
    attributes, editable; your own images to like or compare; the reward model; reset after a confirmation."""
    p_status = gr.Textbox(label="Status", interactive=False, elem_id="profile-status")

    @gr.render(inputs=[profile_tick])
    def entries(_tick, request: gr.Request):
        user = app.user(request)
        rows = app.profile_entries(user)
        more = f", the latest {PROFILE_SHOWN} shown" if len(rows) > PROFILE_SHOWN else ""
        gr.Markdown(f"### Your likes, dislikes and choices ({len(rows)}{more})" if rows else
                    "### Your profile is empty: make a few choices in the Taste tab, or give feedback on images "
                    "you generate.")
        for row in rows[:PROFILE_SHOWN]:
            with gr.Row(elem_classes=["profile-entry", f"profile-{row['kind']}"]):
                labels = ["chosen", "over"] if row["kind"] == "pair" else [row["kind"]]
                gr.HTML(grid_html([(uri, label, "") for uri, label in zip(row["thumbs"], labels, strict=False)],
                                  empty="", size=72, elem="profile-thumb"))
                what = {"like": "Liked", "dislike": "Disliked", "pair": "Chose the first"}[row["kind"]]
                text = what + (f" for “{row['prompt']}”" if row["prompt"] else "") + (
                    f": {row['comment']}" if row["comment"] else "")
                gr.Markdown(html.escape(text))
                forget = gr.Button("Remove", size="sm", elem_classes=["profile-remove"], scale=0)

                @guarded
                def remove(count, request: gr.Request, event_id=row["id"]):
                    removed = app.db.store.delete_profile_event(app.user(request), event_id)
                    learned = {"reward_model": "reward model", "dpo_lora": "LoRA"}
                    names = [learned[n] for n in removed if n in learned]
                    note = f"; your {' and '.join(names)} learned from it went too: train again" if names else ""
                    return "removed it from your profile" + note, count + 1

                forget.click(remove, [profile_tick], [p_status, profile_tick])

    with gr.Accordion("Attributes (derived from your comments, editable)", open=True):
        with gr.Row():
            liked = gr.Textbox(label="Liked attributes (comma-separated)", elem_id="attr-liked")
            disliked = gr.Textbox(label="Disliked attributes (comma-separated)", elem_id="attr-disliked")
        with gr.Row():
            save_attr = gr.Button("Save attributes")
            extract_attr = gr.Button("Derive from comments (VLM)")
            train_btn = gr.Button("Train reward model", variant="primary")
    with gr.Accordion("Your own images", open=False):
        with gr.Row():
            p_image = gr.Image(label="An image", type="filepath", height=200)
            p_comment = gr.Textbox(label="Comment", placeholder="What you like or dislike about it")
        with gr.Row():
            like_btn = gr.Button("Like")
            dislike_btn = gr.Button("Dislike")
        gr.Markdown("A/B choice")
        with gr.Row():
            ab_a = gr.Image(label="A", type="filepath", height=160)
            ab_b = gr.Image(label="B", type="filepath", height=160)
        ab_prompt = gr.Textbox(label="Prompt both were made for")
        with gr.Row():
            a_btn = gr.Button("A is better")
            b_btn = gr.Button("B is better")
    reset_btn = gr.Button("Reset my profile", variant="stop", elem_id="profile-reset")
    with gr.Row(visible=False, elem_id="reset-confirm") as confirm_row:
        gr.Markdown("Forget every like, dislike, choice, attribute and your reward model?")
        yes_btn = gr.Button("Yes, reset it", variant="stop")
        no_btn = gr.Button("Cancel")

    def attrs_text(profile):
        a = profile.attributes
        return ", ".join(a.liked), ", ".join(a.disliked)

    def record(kind, image, comment, count, request):
        if image is None:
            raise ValueError("choose an image first")
        profile = app.profile(app.user(request))
        getattr(profile, kind)(image, comment=comment or "")
        return f"{kind}d the image ({len(profile.events(kind))} in total)", count + 1

    def choose(which, a, b, prompt, count, request):
        if a is None or b is None:
            raise ValueError("choose both images")
        profile = app.profile(app.user(request))
        chosen, rejected = (a, b) if which == "A" else (b, a)
        profile.compare(prompt, chosen, rejected)
        return f"recorded a choice ({len(profile.events('pair'))} in total)", count + 1

    @guarded
    def save_attributes(lk, dl, request: gr.Request):
        profile = app.profile(app.user(request))
        split = [x.strip() for x in (lk or "").split(",") if x.strip()]
        split_d = [x.strip() for x in (dl or "").split(",") if x.strip()]
        profile.set_attributes(split, split_d)
        return (*attrs_text(profile), "attributes saved")

    @guarded
    def derive(request: gr.Request, progress=gr.Progress()):
        progress(0, desc="reading your comments")
        profile = app.profile(app.user(request))
        vlm = app.vlm_pipe.vlm
        with app._vlm_lock:  # the chat tab generates with the same model
            profile.extract_attributes(vlm)
        return (*attrs_text(profile), "attributes derived from your comments")

    @guarded
    def train(request: gr.Request, progress=gr.Progress()):
        progress(0, desc="training the reward model")
        return app.train_reward(app.user(request))  # a reset during the training stores nothing, and says so

    @guarded
    def load_attrs(request: gr.Request):
        return attrs_text(app.profile(app.user(request)))

    @guarded
    def like(image, comment, count, request: gr.Request):
        return record("like", image, comment, count, request)

    @guarded
    def dislike(image, comment, count, request: gr.Request):
        return record("dislike", image, comment, count, request)

    @guarded
    def choose_a(a, b, prompt, count, request: gr.Request):
        return choose("A", a, b, prompt, count, request)

    @guarded
    def choose_b(a, b, prompt, count, request: gr.Request):
        return choose("B", a, b, prompt, count, request)

    @guarded
    def reset(count, request: gr.Request):
        n = app.profile(app.user(request)).reset()
        return f"profile reset: {n} entries removed", count + 1, gr.update(visible=False), "", ""

    bumped = [p_status, profile_tick]
    like_btn.click(like, [p_image, p_comment, profile_tick], bumped, api_name="like")
    dislike_btn.click(dislike, [p_image, p_comment, profile_tick], bumped, api_name="dislike")
    a_btn.click(choose_a, [ab_a, ab_b, ab_prompt, profile_tick], bumped, api_name="choose_a")
    b_btn.click(choose_b, [ab_a, ab_b, ab_prompt, profile_tick], bumped, api_name="choose_b")
    save_attr.click(save_attributes, [liked, disliked], [liked, disliked, p_status], api_name="save_attributes")
    extract_attr.click(derive, None, [liked, disliked, p_status], api_name="extract_attributes")
    train_btn.click(train, None, p_status, api_name="train_reward")
    reset_btn.click(lambda: gr.update(visible=True), None, confirm_row, api_visibility="private")
    yes_btn.click(reset, [profile_tick], [*bumped, confirm_row, liked, disliked], api_name="reset_profile")
    no_btn.click(lambda: gr.update(visible=False), None, confirm_row, api_visibility="private")
    demo.load(load_attrs, None, [liked, disliked], api_visibility="private")
