from continual_transformer.cli import main

main()
