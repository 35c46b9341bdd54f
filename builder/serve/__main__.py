from builder.serve.server import main

main()
