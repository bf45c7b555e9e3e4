"""The Chat tab: a photo, a question, the streamed answer, the concepts and memory it used, and what the turn
proposes to remember (kept or dropped with one click); every chat is kept, and past chats can be continued."""

from ..state import NEW_CONVERSATION, App


def chat_tab(gr, app: App, guarded, demo, memory_tick) -> None:
    from mmpersona import MmpersonaError

    with gr.Row():
        # custom values pass: an id is checked against the caller's own chats when opened
        ch_past = gr.Dropdown(label="Past chats (continue one)", choices=[], value=None, interactive=True,
                              allow_custom_value=True,
                              elem_id="chat-past", scale=4)
        ch_new = gr.Button("New chat", size="sm", elem_id="chat-new", scale=0)
        ch_delete = gr.Button("Delete this chat", size="sm", elem_id="chat-delete", scale=0)
    ch_conv = gr.State(None)  # the kept conversation this chat continues (None: a new one at the next answer)
    with gr.Row():
        ch_image = gr.Image(label="Photo", type="filepath", height=260, elem_id="chat-image")
        chatbot = gr.Chatbot(label="Conversation", height=320, render_markdown=False,  # <bo> stays text
                             elem_id="chat-conversation")
    ch_q = gr.Textbox(label="Question", placeholder="What is <bo> doing?")
    ch_regions = gr.Checkbox(label="Find each concept in the photo (regions)", value=False, elem_id="chat-regions")
    ch_btn = gr.Button("Ask", variant="primary")
    ch_stop = gr.Button("Stop", size="sm", elem_id="chat-stop")
    ch_status = gr.Textbox(label="Status", interactive=False, elem_id="chat-status")
    with gr.Row():
        ch_thumbs = gr.HTML(label="Retrieved", elem_id="chat-thumbs")
        ch_boxes = gr.HTML(label="Where", elem_id="chat-boxes")
    ch_rows = gr.Dataframe(headers=["concept", "score", "source", "box"], label="Retrieved concepts",
                           interactive=False, elem_id="chat-retrieved")
    ch_memory = gr.Textbox(label="Memory", interactive=False, lines=3, elem_id="chat-memory")
    ch_proposed = gr.State([])  # this turn's proposals, waiting for the user's yes
    ch_new_concepts = gr.State([])  # concepts this turn introduced ("this is my friend Anna"), waiting too
    with gr.Row():
        ch_keep = gr.Button("Remember this", size="sm", elem_id="chat-remember")
        ch_drop = gr.Button("Don't remember", size="sm", elem_id="chat-forget")
        ch_add = gr.Button("Add the new concept", size="sm", elem_id="chat-add-concept")

    def ask(image, question, history, regions, conversation, request: gr.Request):
        try:
            user = app.user(request)
            yield from app.chat(user, image, question, history or [], bool(regions),
                                conversation=conversation or NEW_CONVERSATION)
        except (MmpersonaError, ValueError, PermissionError) as e:
            raise gr.Error(str(e)) from e

    # one chat at a time on the shared model: the others wait in Gradio's queue (where a user who leaves is
    # dropped), not in a thread blocked on the model's lock; generation has a queue of its own
    asked = ch_btn.click(ask, [ch_image, ch_q, chatbot, ch_regions, ch_conv],
                         [chatbot, ch_rows, ch_thumbs, ch_boxes, ch_status, ch_memory, ch_proposed, ch_conv,
                          ch_new_concepts],
                         api_name="chat", concurrency_id="vlm", concurrency_limit=1)

    def past(conversation, request: gr.Request):
        """The list of past chats, the one being continued selected."""
        return gr.update(choices=app.conversation_choices(app.user(request)), value=conversation)

    asked.then(guarded(past), [ch_conv], [ch_past], api_visibility="private")
    demo.load(guarded(past), [ch_conv], [ch_past], api_visibility="private")

    @guarded
    def open_past(conversation, request: gr.Request):
        """The chat's turns, and its photo shown inline: the photo field is emptied, so the chat goes on about its
        own photo unless another is uploaded (the app's outputs are never files: see guard.py)."""
        if not conversation:
            return gr.update(), gr.update(), "", gr.update(), None
        messages, photo = app.open_conversation(app.user(request), conversation)
        return messages, None, photo, "continuing a past chat", conversation

    ch_past.input(open_past, [ch_past], [chatbot, ch_image, ch_thumbs, ch_status, ch_conv], api_name="open_chat")
    ch_new.click(lambda: ([], None, None, "", "a new chat: kept from its first answer"), None,
                 [chatbot, ch_conv, ch_past, ch_thumbs, ch_status], api_visibility="private")

    @guarded
    def delete(conversation, request: gr.Request):
        if not conversation:
            return gr.update(), None, gr.update(), "no kept chat open"
        user = app.user(request)
        status = app.delete_conversation(user, conversation)
        return [], None, gr.update(choices=app.conversation_choices(user), value=None), status

    ch_delete.click(delete, [ch_conv], [chatbot, ch_conv, ch_past, ch_status], api_name="delete_chat")

    def settle(accept):
        def run(ids, count, request: gr.Request):
            try:
                if not ids:
                    return "nothing proposed in this turn", [], count
                return app.settle(app.user(request), list(ids), accept), [], count + 1
            except (MmpersonaError, ValueError, PermissionError) as e:
                raise gr.Error(str(e)) from e
        return run

    ch_keep.click(settle(True), [ch_proposed, memory_tick], [ch_memory, ch_proposed, memory_tick],
                  api_name="remember")
    ch_drop.click(settle(False), [ch_proposed, memory_tick], [ch_memory, ch_proposed, memory_tick],
                  api_name="forget")
    @guarded
    def add_concepts(proposals, request: gr.Request):
        if not proposals:
            return "no new concept in this turn", []
        return app.add_proposed_concepts(app.user(request), list(proposals)), []

    ch_add.click(add_concepts, [ch_new_concepts], [ch_memory, ch_new_concepts], api_name="add_new_concept")
    # Stop: the answer's generator is closed, which ends the generation at its next token (AnswerStream)
    ch_stop.click(None, None, None, cancels=[asked], api_visibility="private")
