"""The full gateway as conf/anythingllm.conf sets it up, for the runs
outside pytest (t/stack.py, t/soak.py); @REDIS@ and @PORT@ are filled
in by lib.processes.Nginx."""

# the full gateway, as conf/anythingllm.conf sets it up
GATEWAY = """
    anythingllm_redis      @REDIS@ timeout=100ms prefix=anythingllm:;
    anythingllm_key_cache  zone=anythingllm_keys:10m valid=30s invalid=5s;
    anythingllm_conversation_ttl  24h;

    server {
        listen  127.0.0.1:@PORT@;

        anythingllm_upstream_key  UPSTREAM-KEY-0001-TEST;
        anythingllm_auth          on;
        anythingllm_cors          *;

        proxy_http_version  1.1;
        proxy_set_header    Connection "";
        proxy_buffering     off;
        proxy_read_timeout  600s;

        location /v1/ {
            anythingllm_openai  on;
            proxy_pass          http://anythingllm;
        }

        location /api/v1/openai/ {
            anythingllm_openai  on;
            proxy_pass          http://anythingllm;
        }

        location /api/v1/ {
            client_max_body_size  64m;
            proxy_pass            http://anythingllm;
        }

        location / {
            return  404;
        }
    }
"""
