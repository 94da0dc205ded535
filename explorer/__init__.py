"""The stage explorer: every stage's checkpoint side by side in the browser, and an OpenAI-compatible API.

    python -m explorer.serve            # or: make serve

serve.py is the HTTP server, serve_requests.py reads a request as OpenAI defines it, serve_replies.py
generates and judges the replies; index.html is the page it serves; browser.py finds the headless
Chromium that the page's tests, its benchmark and the docs' picture drive.
"""
