"""Background responses: OpenAI's Responses API background mode, for any upstream.

`handlers` serves /v1/responses with "background": true and /v1/responses/{id}; `pump`
writes the upstream's events into the response's event log (the detached streams' engine:
`gateway.streams.log`, memory or Redis); `objects` is the log's layout and the Responses API's
shapes, with no I/O.
"""
