"""mmpersona demo app: your concepts, personalized chat, your taste, personalized generation.

    python gradio_app.py [--preset tiny|default] [--db PATH] [--host H] [--port P]
    python gradio_app.py --auth-file logins.txt                                    # several users
    python gradio_app.py --auth-file logins.txt --trusted-proxies 127.0.0.1        # behind a reverse proxy

Built only on the public Python API. With logins (`--auth-file`, one `user:password` per line; never on the
command line, where every local user can read it) each logged-in user sees and changes only their own data;
without them the app runs single-user (as user "default") and says so. README "The app with several users"
says how results and files are kept to the user who made them.
Requires the `app` extra: pip install "mmpersona[app]".

This file only launches: the app itself is the package `mmpersona.app` (its state, one module per tab, the HTML
helpers, logins and the session guard), whose names are re-exported here.
"""

import argparse
import os

from mmpersona.app import *  # noqa: F403 - the app's public names stay reachable as `gradio_app.X`
from mmpersona.app import build_app, launch, read_logins
from mmpersona.app.guard import parse_proxies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "default"])
    parser.add_argument("--db", default=os.environ.get("MMPERSONA_DB"),
                        help="concept database: a path or postgresql:// URL (default: env MMPERSONA_DB, else the user data dir)")
    parser.add_argument("--auth-file", default=os.environ.get("MMPERSONA_AUTH_FILE"), metavar="PATH",
                        help="logins, one user:password per line (default: env MMPERSONA_AUTH_FILE); turns on "
                             "multi-user mode")
    parser.add_argument("--auth", help=argparse.SUPPRESS)
    parser.add_argument("--trusted-proxies", default=os.environ.get("MMPERSONA_TRUSTED_PROXIES", ""), metavar="IPS",
                        help="comma-separated addresses or networks of the reverse proxies in front of the app, whose "
                             "X-Forwarded-For names the client (default: env MMPERSONA_TRUSTED_PROXIES, else none: "
                             "the client is the socket's peer); the login throttle counts per client")
    parser.add_argument("--face", action="store_true",
                        help='chat also finds person concepts by face (dlib: pip install "mmpersona[face]")')
    parser.add_argument("--device", default="auto")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args()
    if args.auth:
        parser.error("--auth is gone: passwords on the command line are readable by every local user "
                     "(/proc/PID/cmdline). Put user:password lines in a file and pass --auth-file PATH.")
    try:
        proxies = parse_proxies(args.trusted_proxies)
    except ValueError as e:
        parser.error(f"--trusted-proxies: {e}")
    logins = read_logins(args.auth_file) if args.auth_file else {}
    demo = build_app(args.preset, args.db, multi_user=bool(logins), device=args.device, face=args.face)
    launch(demo, logins=logins, trusted_proxies=[str(p) for p in proxies], server_name=args.host,
           server_port=args.port)


if __name__ == "__main__":
    main()
