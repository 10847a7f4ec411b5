"""The stand-in AnythingLLM server of the tests, split by concern.

    js             JavaScript's coercions, slugs, dates, ETags
    state          the in-memory server: workspaces, documents, chats,
                   threads, connections, scripts and waits
    express        answers shaped like Express's, body parsing, CORS
    stream         client presence, paced writes, the SSE response
    routes         the route table, the key check, workspace lookups
    workspaces     workspace, thread and chat-history endpoints
    chat           chat and stream-chat, magic words
    scripted       answers scripted through /__test/script
    documents      uploads, the document list, removal
    openai_compat  AnythingLLM's own OpenAI-like endpoints
    control        the /__test/ endpoints
    server         the entry point of every request, the listener

t/backend.py runs it and documents the behaviour as a whole.
"""
