"""The Concepts tab: your concepts as a thumbnail grid, an add form, an edit form, import."""

import html

from ..render import grid_html
from ..state import App


def concepts_tab(gr, app: App, guarded, demo) -> None:
    """A thumbnail grid; an add form that clears after each add; an edit form for the concept picked from the
    list (its images as thumbnails, each with a remove button; images added to it; delete after a confirmation)."""
    tick = gr.State(0)  # bumped by every change: the edited concept's images render again
    gallery = gr.HTML(label="Your concepts", elem_id="concept-gallery")
    table = gr.Dataframe(headers=["handle", "category", "info", "images", "aliases"], label="Details",
                         interactive=False)
    status = gr.Textbox(label="Status", interactive=False, elem_id="concept-status")
    with gr.Accordion("Add a concept", open=True):
        with gr.Row():
            c_name = gr.Textbox(label="Name", placeholder="<bo>", elem_id="add-name")
            c_cat = gr.Textbox(label="Category", placeholder="dog", elem_id="add-category")
        c_info = gr.Textbox(label="Info", placeholder="My Shiba Inu, 3 years old", elem_id="add-info")
        c_files = gr.File(label="Images", file_count="multiple", file_types=["image"], elem_id="concept-images",
                          height=140)
        add_btn = gr.Button("Add concept", variant="primary")
    with gr.Accordion("Edit a concept", open=True):
        # a typed name works too (and API clients send names): each handler resolves it in the user's own concepts
        pick = gr.Dropdown(label="Concept to edit", choices=[], value=None, elem_id="edit-pick",
                           allow_custom_value=True)
        with gr.Row():
            e_name = gr.Textbox(label="Edit name", elem_id="edit-name")
            e_cat = gr.Textbox(label="Edit category", elem_id="edit-category")
            e_aliases = gr.Textbox(label="Aliases (comma-separated)", elem_id="edit-aliases")
        e_info = gr.Textbox(label="Edit info", elem_id="edit-info")

        @gr.render(inputs=[pick, tick])
        def concept_images(ref, _tick, request: gr.Request):
            if not ref:
                return
            from concept_db import ConceptNotFound

            user = app.user(request)
            try:
                concept = app.db.resolve(user, ref)
            except ConceptNotFound:  # deleted or renamed meanwhile, or a name typed: nothing to show
                return
            with gr.Row(elem_id="edit-images"):
                for number, h in enumerate(concept.images, 1):
                    with gr.Column(min_width=130, scale=0):
                        gr.HTML(grid_html([(app.thumbnail(user, h), f"image {number}", h[:8])], empty="",
                                          size=110, elem="edit-image"))
                        remove = gr.Button(f"Remove image {number}", size="sm", elem_classes=["remove-image"])

                        @guarded
                        def remove_image(ref, count, request: gr.Request, h=h):
                            user = app.user(request)
                            msg = app.remove_concept_image(user, ref, h)
                            return msg, count + 1, app.gallery(user), app.concept_table(user)

                        remove.click(remove_image, [pick, tick], [status, tick, gallery, table])

        e_files = gr.File(label="Add images to it", file_count="multiple", file_types=["image"],
                          elem_id="edit-images-upload", height=140)
        with gr.Row():
            save_btn = gr.Button("Save changes")
            more_btn = gr.Button("Add these images")
            del_btn = gr.Button("Delete concept", variant="stop")
        with gr.Row(visible=False, elem_id="delete-confirm") as confirm_row:
            confirm_text = gr.Markdown()
            yes_btn = gr.Button("Yes, delete it", variant="stop")
            no_btn = gr.Button("Cancel")
    with gr.Accordion("Import", open=False):
        imp_file = gr.File(label="RAP database or folder (zip), or an mmpersona archive")
        imp_fmt = gr.Radio(["rap", "folder", "archive"], value="rap", label="Format")
        imp_btn = gr.Button("Import")

    def views(user: str, selected: str | None = None):
        """Gallery, table and the pick list (keeping `selected` when it still exists)."""
        choices = app.concept_choices(user)
        return (app.gallery(user), app.concept_table(user),
                gr.update(choices=choices, value=selected if selected in choices else None))

    @guarded
    def refresh(request: gr.Request):
        return views(app.user(request))

    @guarded
    def add(name, cat, info, files, request: gr.Request):
        user = app.user(request)
        msg = app.add_concept(user, name, cat, info, files)
        # stored: the whole form is cleared, so the next concept starts from nothing (no photos carried over)
        return (msg, *views(user), None, "", "", "")

    @guarded
    def fill(ref, request: gr.Request):
        return app.concept_fields(app.user(request), ref)

    @guarded
    def save(ref, name, cat, info, aliases, count, request: gr.Request):
        user = app.user(request)
        msg, handle = app.save_concept(user, ref, name, cat, info, aliases)
        return (msg, *views(user, handle), count + 1)

    @guarded
    def add_more(ref, files, count, request: gr.Request):
        user = app.user(request)
        msg = app.add_concept_images(user, ref, files)
        return msg, app.gallery(user), app.concept_table(user), count + 1, gr.update(value=None)

    @guarded
    def ask_delete(ref, request: gr.Request):
        if not ref:
            raise ValueError("pick a concept first")
        c = app.db.resolve(app.user(request), ref)
        return gr.update(visible=True), f"Delete **{html.escape(c.handle)}** and its {len(c.images)} image(s)?"

    @guarded
    def delete(ref, request: gr.Request):
        user = app.user(request)
        msg = app.delete_concept(user, ref)
        return (msg, *views(user), gr.update(visible=False), "", "", "", "")

    @guarded
    def do_import(upload, fmt, request: gr.Request):
        user = app.user(request)
        if upload is None:
            raise ValueError("choose a file to import")
        return (app.import_upload(user, upload, fmt), *views(user))

    listing = [gallery, table, pick]
    add_btn.click(add, [c_name, c_cat, c_info, c_files], [status, *listing, c_files, c_name, c_cat, c_info],
                  api_name="add_concept")
    pick.change(fill, [pick], [e_name, e_cat, e_info, e_aliases], api_name="concept_fields")
    save_btn.click(save, [pick, e_name, e_cat, e_info, e_aliases, tick], [status, *listing, tick],
                   api_name="edit_concept")
    more_btn.click(add_more, [pick, e_files, tick], [status, gallery, table, tick, e_files],
                   api_name="add_concept_images")
    del_btn.click(ask_delete, [pick], [confirm_row, confirm_text], api_visibility="private")
    yes_btn.click(delete, [pick], [status, *listing, confirm_row, e_name, e_cat, e_info, e_aliases],
                  api_name="delete_concept")
    no_btn.click(lambda: gr.update(visible=False), None, confirm_row, api_visibility="private")
    imp_btn.click(do_import, [imp_file, imp_fmt], [status, *listing], api_name="import_concepts")
    demo.load(refresh, None, listing, api_name="list_concepts")
