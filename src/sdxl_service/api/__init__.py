"""The HTTP process: the OpenAI-compatible /v1 API.

Routes, schemas, request rules, serving, responses, errors, middleware, keys,
files, the playground and the client of the render service. It never imports
torch, `render` or `engine`: it talks to the render workers through `contract`.
"""
