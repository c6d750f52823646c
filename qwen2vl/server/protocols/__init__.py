"""The other protocols the server speaks, each one module translating its requests into the chat
endpoint's `ChatCompletionRequest` and the chat path's results back into its own replies."""
