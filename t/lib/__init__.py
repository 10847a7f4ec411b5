"""What the tests share: the RESP client (resp), the processes they run
(processes), HTTP and SSE clients (helpers), and the assertions on
OpenAI answers and the gateway's refusals (openai, auth).  Test files
import from here, never from each other nor from conftest."""
