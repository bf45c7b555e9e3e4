"""The Chat tab: a photo, a question, the streamed answer, the concepts and memory it used, and what the turn
proposes to remember (kept or dropped with one click)."""

from ..state import App


def chat_tab(gr, app: App, memory_tick) -> None:
    from mmpersona import MmpersonaError

    with gr.Row():
        ch_image = gr.Image(label="Photo", type="filepath", height=260, elem_id="chat-image")
        chatbot = gr.Chatbot(label="Conversation", height=320, render_markdown=False)  # <bo> stays text
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
    with gr.Row():
        ch_keep = gr.Button("Remember this", size="sm", elem_id="chat-remember")
        ch_drop = gr.Button("Don't remember", size="sm", elem_id="chat-forget")

    def ask(image, question, history, regions, request: gr.Request):
        try:
            user = app.user(request)
            yield from app.chat(user, image, question, history or [], bool(regions))
        except (MmpersonaError, ValueError, PermissionError) as e:
            raise gr.Error(str(e)) from e

    # one chat at a time on the shared model: the others wait in Gradio's queue (where a user who leaves is
    # dropped), not in a thread blocked on the model's lock; generation has a queue of its own
    asked = ch_btn.click(ask, [ch_image, ch_q, chatbot, ch_regions],
                         [chatbot, ch_rows, ch_thumbs, ch_boxes, ch_status, ch_memory, ch_proposed], api_name="chat",
                         concurrency_id="vlm", concurrency_limit=1)

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
    # Stop: the answer's generator is closed, which ends the generation at its next token (AnswerStream)
    ch_stop.click(None, None, None, cancels=[asked], api_visibility="private")
