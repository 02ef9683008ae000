from drtool.cli import main_entry

main_entry()
