"""Other APIs over the chat path: each module translates one protocol's requests into a
`ChatCompletionRequest` and the chat path's replies (a `ChatCompletion`, or its stream of
`ChatCompletionChunk`s) back into the protocol's own."""
