"""``ddpm serve``: a web page to sample a trained model and watch it denoise.

One page (``web/index.html``) and a small JSON API, served by Starlette on uvicorn (the
``[serve]`` extra)::

    GET  /                        the page
    GET  /api/model               the model, the sample settings it takes and this server's limits
    GET  /api/status              the running generation, those waiting, what has finished
    POST /api/generate            JSON settings -> 400 with {"error": ...} for a bad value, or a
                                  text/event-stream of events: queued (generations ahead), started,
                                  frame (x_t and, asked for, the predicted x0 as PNG grids), then
                                  done (the grid) | error | cancelled
    GET  /api/jobs/ID/grid.png    a finished generation's grid; /api/jobs/ID/denoising.gif its
                                  reverse process (the newest few are kept, see Limits.keep_bytes)

Every answer goes only to a request addressed to this server (its Host, see :class:`Served`), and
a generation starts only from a JSON POST of no other site's page (its Origin): a page elsewhere
cannot reach a server on loopback by pointing its own name at 127.0.0.1 (DNS rebinding), nor
start work here with a form or a 'simple' cross-origin request (CSRF). A refusal, like every
bad request, is a 4xx with {"error": ...}.

The frames are the sampler's own: ``Pipeline.generate``'s step callback, the one ``Pipeline.trace``
and ``ddpm viz reverse`` use, so the grid a page shows is the grid ``ddpm sample`` writes with the
same settings and seed. One :class:`Engine` per server runs one generation at a time on the
model's device, in its own thread, in the order the requests came; closing the page (the stream's
connection) cancels its generation, waiting or running, at the next step.
"""

from .app import WebServer, bind, create_app
from .engine import Engine, Job
from .requests import GenerateRequest, Limits, RequestError, model_info, parse_body, parse_request

__all__ = ["Engine", "GenerateRequest", "Job", "Limits", "RequestError", "WebServer", "bind",
           "create_app", "model_info", "parse_body", "parse_request"]
