"""Files and the console: folders written whole or not at all (`atomic`), pictures and GIFs (`media`), what a
measurement ran on (`machine`), lines for the person running genie, printed once however many processes run (`log`).
"""
