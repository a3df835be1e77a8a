"""Playing a trained world: sessions (`session`), the local web server and its page (`server`, `page.html`) and
the terminal player (`terminal`). `genie play RUN` starts the server; `genie play RUN --terminal` the terminal one."""
