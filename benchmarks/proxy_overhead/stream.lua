-- wrk request script for the streaming workload: the same chat request as post.lua with
-- "stream": true, to nginx's SSE location directly and through the gateway's chat-stream model
-- (nginx ignores the body; it answers reply.sse, 64 chunks and [DONE], to every request).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"chat-stream","messages":[{"role":"user","content":"Name three colors."}],"max_tokens":62,"temperature":0,"stream":true}'
