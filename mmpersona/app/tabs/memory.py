"""The Memory tab: what you told the assistant, each entry forgettable, proposals to accept, and your own."""

import html

from ..config import PROFILE_SHOWN
from ..state import App


def memory_tab(gr, app: App, guarded, memory_tick) -> None:
    """Your memory, newest first: each entry with what it is about and whether it holds now; a proposal can be
    accepted, any entry forgotten; and a form to add one yourself."""
    m_status = gr.Textbox(label="Status", interactive=False, elem_id="memory-status")

    @gr.render(inputs=[memory_tick])
    def entries(_tick, request: gr.Request):
        rows = app.memory_entries(app.user(request))
        more = f", the latest {PROFILE_SHOWN} shown" if len(rows) >= PROFILE_SHOWN else ""
        gr.Markdown(f"### What you told the assistant ({len(rows)}{more})" if rows else
                    "### Nothing remembered yet: tell the assistant about your concepts in the Chat tab, or add "
                    "something here.")
        for row in rows:
            with gr.Row(elem_classes=["memory-entry", f"memory-{row['status']}"]):
                what = f"{row['about']} · {row['state']}" + (f" · state of {row['topic']}" if row["topic"] else "")
                gr.Markdown(f"**{html.escape(row['text'])}**  \n{html.escape(what)}")
                if row["status"] == "proposed":
                    accept = gr.Button("Remember", size="sm", elem_classes=["memory-accept"], scale=0)

                    @guarded
                    def do_accept(count, request: gr.Request, entry_id=row["id"]):
                        return app.settle(app.user(request), [entry_id], True), count + 1

                    accept.click(do_accept, [memory_tick], [m_status, memory_tick])
                forget = gr.Button("Forget", size="sm", elem_classes=["memory-forget"], scale=0)

                @guarded
                def do_forget(count, request: gr.Request, entry_id=row["id"]):
                    return app.settle(app.user(request), [entry_id], False), count + 1

                forget.click(do_forget, [memory_tick], [m_status, memory_tick])

    with gr.Accordion("Remember something yourself", open=False):
        with gr.Row():
            m_text = gr.Textbox(label="What to remember", placeholder="Bo's bed is on the balcony.",
                                elem_id="memory-text")
            m_concept = gr.Textbox(label="About (a concept; empty: you)", placeholder="bo", elem_id="memory-concept")
            m_topic = gr.Textbox(label="State of (empty: a lasting fact)", placeholder="bed", elem_id="memory-topic")
        m_add = gr.Button("Remember", elem_id="memory-add")

    @guarded
    def add(text, concept, topic, count, request: gr.Request):
        return app.remember(app.user(request), text, concept, topic), count + 1

    m_add.click(add, [m_text, m_concept, m_topic, memory_tick], [m_status, memory_tick])
