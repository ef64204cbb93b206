"""The scripts' command lines (argparse parsers and the constants they show), kept free of heavy imports so that
`python main_*.py --help` answers before torch is loaded. Depends on util/cli.py and util/flags.py only."""
