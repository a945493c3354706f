"""What leaves the workbook: figures in one house style with the data behind them (`plots`), the headless
re-run of every notebook (`reproduce`) and the report written as a blog post (`report`)."""
