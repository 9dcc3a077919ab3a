"""The baseline for the enqueue API: the same functions-framework stack answering a trivial function.

It reads the request body (so both sides receive the same bytes) and answers a small JSON object,
nothing else: what is left when parsing, auth, PostgreSQL and Redis are taken away.
"""

import functions_framework


@functions_framework.http
def trivial(request):
    request.get_data()
    return {"task_id": 0, "status": "queued"}, 202
